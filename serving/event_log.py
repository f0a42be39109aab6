"""Completions, feedback and canary verdicts to Kafka.

Completion events never hold up a response: they go through a bounded buffer to a sender thread (a full
buffer drops and counts). Feedback is the opposite: the client is told "accepted" only once Kafka has
acknowledged the event, so an accepted piece of feedback is never lost. A canary's verdict goes to the
policy topic, for the other replicas.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Protocol

from kafka import KafkaProducer

from common.kafka import ensure_topics, make_producer, wait_for_broker
from common.settings import SharedSettings
from feedback import CompletionEvent, FeedbackEvent, PolicyEvent, referenced_choices
from serving import metrics

log = logging.getLogger(__name__)


class EventLogUnavailable(Exception):
    """The event could not be stored durably in time."""


class EventSink(Protocol):
    def log_completion(self, event: CompletionEvent) -> None: ...

    async def record_feedback(self, event: FeedbackEvent) -> None: ...

    async def announce_policy(self, event: PolicyEvent) -> None: ...

    def close(self) -> None: ...


_STOP = object()


class KafkaEventLog:
    def __init__(self, settings: SharedSettings, queue_size: int, ack_timeout_s: float):
        wait_for_broker(settings)
        ensure_topics(settings, [settings.completions_topic, settings.feedback_topic, settings.policy_topic])
        self._settings = settings
        self._ack_timeout_s = ack_timeout_s
        self._producer: KafkaProducer = make_producer(settings)
        self._buffer: queue.Queue = queue.Queue(maxsize=queue_size)
        self._sender = threading.Thread(target=self._send_completions, name="completion-log", daemon=True)
        self._sender.start()

    def log_completion(self, event: CompletionEvent) -> None:
        try:
            self._buffer.put_nowait(event)
        except queue.Full:
            metrics.EVENTS_DROPPED.inc()

    async def record_feedback(self, event: FeedbackEvent) -> None:
        await asyncio.to_thread(self._send_and_wait, event)

    async def announce_policy(self, event: PolicyEvent) -> None:
        future = self._producer.send(self._settings.policy_topic, key=event.version, value=event)
        await asyncio.to_thread(future.get, timeout=self._ack_timeout_s)

    def close(self) -> None:
        self._buffer.put(_STOP)
        self._sender.join(timeout=30)
        self._producer.flush(timeout=10)
        self._producer.close(timeout=10)

    def _send_and_wait(self, event: FeedbackEvent) -> None:
        key = _feedback_key(event)
        try:
            self._producer.send(self._settings.feedback_topic, key=key, value=event).get(timeout=self._ack_timeout_s)
        except Exception as exc:  # timeout or broker error: the caller answers 503 and the client retries
            metrics.EVENTS_FAILED.labels("feedback").inc()
            raise EventLogUnavailable(str(exc)) from exc
        metrics.EVENTS_SENT.labels("feedback").inc()

    def _send_completions(self) -> None:
        while (event := self._buffer.get()) is not _STOP:
            future = self._producer.send(self._settings.completions_topic, key=event.completion_id, value=event)
            future.add_callback(lambda _: metrics.EVENTS_SENT.labels("completion").inc())
            future.add_errback(self._completion_failed)

    @staticmethod
    def _completion_failed(exc: Exception) -> None:
        metrics.EVENTS_FAILED.labels("completion").inc()
        log.warning("completion event not delivered: %s", exc)


def _feedback_key(event: FeedbackEvent) -> str:
    # Keyed like the completion it is about, so both land in the same partition of their topics.
    return referenced_choices(event.feedback)[0].completion_id
