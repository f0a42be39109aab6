from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.auth import is_admin
from serving.deps import ChatServiceDep
from serving.protocol import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse

router = APIRouter()

ERRORS = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse}}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, chat: ChatServiceDep, request: Request):
    prepared = chat.prepare(body, operator=is_admin(request))
    headers = {"x-policy-version": prepared.policy.name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(chat.stream(prepared, include_usage), media_type="text/event-stream",
                                 headers=headers)
    response = await chat.complete(prepared)
    return JSONResponse(response.model_dump(), headers=headers)
