"""Accepting feedback: attribution, idempotency, abuse limits, then Kafka; one item at a time or a batch.

In order: the item's answers are checked (the route's check: signed completion ids), a key already seen
returns its first answer, the app key's and the user's token buckets must each have a token, and the event
is answered 202 once Kafka holds it. The event names the app key (a digest) and the hashed `user`; the
canary sees the same user, so that both it and the trainer count one user's latest opinion on an answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from feedback import Feedback, FeedbackEvent, idempotent_event_id
from serving import metrics
from serving.canary_evidence import approval
from serving.chat import hash_user
from serving.completion_ids import ServedAnswer
from serving.errors import APIError, bad_request, describe_errors
from serving.event_log import EventLogUnavailable, EventSink
from serving.idempotency import IdempotencyCache, IdempotencyConflict
from serving.policy import PolicyManager
from serving.protocol import BatchItemResult, ErrorInfo, FeedbackAccepted, FeedbackRequest
from serving.rate_limit import FeedbackLimits, RateLimited, TokenBuckets
from serving.settings import ServingSettings

# Raises APIError when the feedback names answers that were not served; else returns what the verified ids
# say of each answer it names (feedback.referenced_choices' order).
Check = Callable[[Feedback], Sequence[ServedAnswer]]


class FeedbackIntake:
    def __init__(self, settings: ServingSettings, events: EventSink, policies: PolicyManager):
        self._events, self._policies = events, policies
        self._cache: IdempotencyCache[FeedbackAccepted] = IdempotencyCache(settings.idempotency_cache_size)
        self._limits = FeedbackLimits(
            TokenBuckets(settings.feedback_rate_per_key, settings.feedback_burst_per_key),
            TokenBuckets(settings.feedback_rate_per_user, settings.feedback_burst_per_user),
        )

    async def submit(self, request: FeedbackRequest, key_id: str | None, idempotency_key: str | None,
                     check: Check) -> FeedbackAccepted:
        """Accept one piece of feedback or raise APIError. `idempotency_key`: the Idempotency-Key header."""
        item = request.root
        if item.event_id and idempotency_key and item.event_id != idempotency_key:
            raise bad_request("'event_id' and the Idempotency-Key header differ", param="event_id")
        key = item.event_id or idempotency_key
        feedback, user_hash = request.feedback(), hash_user(item.user)
        if key is None:
            return await self._accept(feedback, user_hash, key_id, None, check)
        fingerprint = hashlib.sha256(f"{user_hash}\0{feedback.model_dump_json()}".encode()).hexdigest()
        event_id = idempotent_event_id(key_id, key)
        try:
            return await self._cache.run((key_id, key), fingerprint,
                                         lambda: self._accept(feedback, user_hash, key_id, event_id, check))
        except IdempotencyConflict:
            raise APIError(409, f"idempotency key {key!r} was used with another request body",
                           param="event_id", code="idempotency_conflict") from None

    async def submit_batch(self, items: list[object], key_id: str | None, idempotency_key: str | None,
                           check: Check) -> list[BatchItemResult]:
        """Each item on its own: one bad item does not sink the others. Under an Idempotency-Key header,
        item i's key is `<key>/<i>` (unless it has an `event_id`), so the whole batch can be retried."""
        async def one(index: int, raw: object) -> BatchItemResult:
            try:
                request = FeedbackRequest.model_validate(raw)
                item_key = None if idempotency_key is None or request.root.event_id else f"{idempotency_key}/{index}"
                accepted = await self.submit(request, key_id, item_key, check)
                return BatchItemResult(index=index, status=202, id=accepted.id)
            except ValidationError as exc:
                message, param = describe_errors(exc.errors())
                error = ErrorInfo(message=message, type="invalid_request_error", param=param)
                return BatchItemResult(index=index, status=400, error=error)
            except APIError as exc:
                error = ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
                retry_after = int((exc.headers or {}).get("Retry-After", 0)) or None
                return BatchItemResult(index=index, status=exc.status, error=error, retry_after=retry_after)

        # Concurrently: the items wait on Kafka's acknowledgements together, not one after another.
        return list(await asyncio.gather(*(one(index, raw) for index, raw in enumerate(items))))

    async def _accept(self, feedback: Feedback, user_hash: str | None, key_id: str | None,
                      event_id: str | None, check: Check) -> FeedbackAccepted:
        answers = check(feedback)
        try:
            self._limits.admit(key_id, user_hash)
        except RateLimited as exc:
            metrics.FEEDBACK_REJECTED.labels("rate_limited").inc()
            raise APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(math.ceil(exc.retry_after_s))}) from None
        ids = {"event_id": event_id} if event_id else {}
        event = FeedbackEvent(feedback=feedback, user_hash=user_hash, app_key_id=key_id, **ids)
        try:
            await self._events.record_feedback(event)
        except EventLogUnavailable as exc:
            raise APIError(503, f"feedback could not be stored right now ({exc}); retry", type="service_unavailable",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None
        metrics.FEEDBACK.labels(feedback.type).inc()
        if (vote := approval(feedback)) is not None:  # thumbs and ratings judge one answer: answers[0]
            metrics.FEEDBACK_VOTES.labels(answers[0].version, "up" if vote else "down").inc()
        self._policies.observe_feedback(feedback, user_hash, answers)
        return FeedbackAccepted(id=event.event_id)
