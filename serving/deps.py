"""`Annotated` dependency aliases: routes declare what they need, app.py decides what it is."""

from typing import Annotated

from fastapi import Depends, Request

from serving.chat import ChatService
from serving.completion_ids import CompletionIds
from serving.engine import EngineClient
from serving.event_log import EventSink
from serving.feedback_intake import FeedbackIntake
from serving.policy import PolicyManager


def _state(name: str):
    # async: FastAPI runs a plain `def` dependency on a worker thread, a hop per request per dependency.
    async def get(request: Request):
        return getattr(request.app.state, name)

    return Depends(get)


ChatServiceDep = Annotated[ChatService, _state("chat")]
PoliciesDep = Annotated[PolicyManager, _state("policies")]
EventsDep = Annotated[EventSink, _state("events")]
CompletionIdsDep = Annotated[CompletionIds, _state("completion_ids")]
EngineDep = Annotated[EngineClient, _state("engine")]
FeedbackIntakeDep = Annotated[FeedbackIntake, _state("feedback_intake")]
