"""POST /v1/feedback and its batch form; serving/feedback_intake.py does the accepting."""

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from feedback import Feedback, referenced_choices
from serving.auth import key_id
from serving.completion_ids import (
    CompletionIds,
    ExpiredCompletionId,
    InvalidCompletionId,
    ServedAnswer,
    VerifiedCompletion,
)
from serving.deps import CompletionIdsDep, FeedbackIntakeDep
from serving.errors import APIError, bad_request, not_found
from serving.protocol import (
    ErrorResponse,
    FeedbackAccepted,
    FeedbackBatchRequest,
    FeedbackBatchResult,
    FeedbackRequest,
)

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 410, 413, 429, 503)}
IDEMPOTENCY_KEY = Header(None, alias="Idempotency-Key", min_length=1, max_length=128,
                         description="A retry with the same key gets the first answer and makes no second event.")


@router.post("/v1/feedback", status_code=202, response_model=FeedbackAccepted, responses=ERRORS)
async def create_feedback(
    body: FeedbackRequest, request: Request, ids: CompletionIdsDep, intake: FeedbackIntakeDep,
    idempotency_key: str | None = IDEMPOTENCY_KEY,
) -> FeedbackAccepted:
    """Thumbs, 1-7 ratings, corrections, pairwise choices or rankings about answers this service gave.
    Answered once Kafka has the event: 202 means it will reach the trainer."""
    return await intake.submit(body, key_id(request), idempotency_key, lambda feedback: _check(ids, feedback))


@router.post("/v1/feedback/batch", status_code=207, response_model=FeedbackBatchResult, responses=ERRORS)
async def create_feedback_batch(
    body: FeedbackBatchRequest, request: Request, ids: CompletionIdsDep, intake: FeedbackIntakeDep,
    idempotency_key: str | None = IDEMPOTENCY_KEY,
) -> JSONResponse:
    """Up to 100 pieces of feedback, each accepted or refused on its own: 207 with one result per item, in
    order (`status` 202 with its `id`, or the item's error)."""
    results = await intake.submit_batch(body.feedback, key_id(request), idempotency_key,
                                        lambda feedback: _check(ids, feedback))
    result = FeedbackBatchResult(accepted=sum(r.status == 202 for r in results), data=results)
    waits = [r.retry_after for r in results if r.retry_after]
    return JSONResponse(result.model_dump(), status_code=207,
                        headers={"Retry-After": str(max(waits))} if waits else None)


def _check(ids: CompletionIds, feedback: Feedback) -> list[ServedAnswer]:
    """Every answer the feedback names was served: its completion id is signed, fresh, and has the choice.
    Returns what the ids say of each of those answers."""
    answers = []
    for ref in referenced_choices(feedback):
        completion = _verify(ids, ref.completion_id)
        if ref.choice_index >= len(completion.versions):
            raise bad_request(f"completion {ref.completion_id!r} has {len(completion.versions)} choice(s); "
                              f"choice_index {ref.choice_index} does not exist", param="choice_index")
        answers.append(completion.answer(ref.choice_index))
    return answers


def _verify(ids: CompletionIds, completion_id: str) -> VerifiedCompletion:
    """What the signed id says: 404 if no replica issued it, 410 if too old."""
    try:
        return ids.verify(completion_id)
    except InvalidCompletionId as exc:
        raise not_found(str(exc), param="completion_id") from None
    except ExpiredCompletionId as exc:
        raise APIError(410, str(exc), param="completion_id", code="completion_expired") from None
