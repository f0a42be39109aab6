from fastapi import APIRouter

from feedback import FeedbackEvent, referenced_choices
from serving import metrics
from serving.completion_ids import CompletionIds, ExpiredCompletionId, InvalidCompletionId
from serving.deps import CompletionIdsDep, EventsDep, PoliciesDep
from serving.errors import APIError, bad_request, not_found
from serving.event_log import EventLogUnavailable
from serving.protocol import ErrorResponse, FeedbackAccepted, FeedbackRequest

router = APIRouter()

ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 410, 413, 503)}


@router.post("/v1/feedback", status_code=202, response_model=FeedbackAccepted, responses=ERRORS)
async def create_feedback(
    body: FeedbackRequest, ids: CompletionIdsDep, events: EventsDep, policies: PoliciesDep
) -> FeedbackAccepted:
    """Thumbs, 1-7 ratings, corrections, pairwise choices or rankings about answers this server gave.
    Answered once Kafka has the event: 202 means it will reach the trainer."""
    feedback = body.root
    for ref in referenced_choices(feedback):
        versions = _versions(ids, ref.completion_id)
        if ref.choice_index >= len(versions):
            raise bad_request(f"completion {ref.completion_id!r} has {len(versions)} choice(s); "
                              f"choice_index {ref.choice_index} does not exist", param="choice_index")
    event = FeedbackEvent(feedback=feedback)
    try:
        await events.record_feedback(event)
    except EventLogUnavailable:
        raise APIError(503, "feedback could not be stored right now; retry", type="service_unavailable") from None
    metrics.FEEDBACK.labels(feedback.type).inc()
    policies.observe_feedback(feedback, event.user_hash)
    return FeedbackAccepted(id=event.event_id)


def _versions(ids: CompletionIds, completion_id: str) -> tuple[str, ...]:
    """The version that wrote each choice, from the signed id: 404 if no replica issued it, 410 if too old."""
    try:
        return ids.verify(completion_id).versions
    except InvalidCompletionId as exc:
        raise not_found(str(exc), param="completion_id") from None
    except ExpiredCompletionId as exc:
        raise APIError(410, str(exc), param="completion_id", code="completion_expired") from None
