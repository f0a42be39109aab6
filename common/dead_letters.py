"""Records a consumer cannot parse go to the dead-letter topic, with the reason and where they came from.

Every consumer of this project parses through `parse_record`: a bad record (not JSON, an unknown or newer
schema, no value at all) becomes a `DeadLetter` instead of an exception, so no record can stop a consumer.
`DeadLetterProducer` puts it on the topic (SharedSettings.dead_letter_topic, keyed by the source topic) and
counts it (rlhf_dead_letters_total); an operator reads the topic with any Kafka consumer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter
from pydantic import BaseModel, Field

from common.kafka import ensure_topics, make_producer
from common.settings import SharedSettings

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "rlhf_dead_letters_total", "Records a consumer could not parse, sent to the dead-letter topic.",
    ["topic", "consumer"],
)

T = TypeVar("T")


class DeadLetter(BaseModel):
    """A record that did not parse, as it is kept on the dead-letter topic."""

    topic: str
    partition: int
    offset: int
    key: str | None = None
    value: str | None
    reason: str
    consumer: str  # who gave up on it: "trainer", "serving"
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def parse_record(record: ConsumerRecord, parse: Callable[[str], T], consumer: str) -> T | DeadLetter:
    """`parse(record.value)`, or the DeadLetter saying why not. Any exception counts: whatever a record
    holds, the consumer goes on with the next one."""
    try:
        if record.value is None:
            raise ValueError("record has no value")
        return parse(record.value)
    except Exception as exc:
        return DeadLetter(topic=record.topic, partition=record.partition, offset=record.offset, key=record.key,
                          value=record.value, reason=f"{type(exc).__name__}: {exc}"[:2000], consumer=consumer)


class DeadLetterProducer:
    """Sends dead letters; its producer and topic are made at the first one (most consumers never need it)."""

    def __init__(self, settings: SharedSettings):
        self._settings = settings
        self._producer: KafkaProducer | None = None

    def send(self, letter: DeadLetter) -> None:
        """Queue `letter` for the topic; a failure to deliver it is logged, never raised."""
        DEAD_LETTERS.labels(letter.topic, letter.consumer).inc()
        log.warning("dead letter from %s[%d]@%d: %s", letter.topic, letter.partition, letter.offset, letter.reason)
        try:
            if self._producer is None:
                ensure_topics(self._settings, [self._settings.dead_letter_topic])
                self._producer = make_producer(self._settings)
            future = self._producer.send(self._settings.dead_letter_topic, key=letter.topic, value=letter)
            future.add_errback(lambda exc: log.error("dead letter not delivered: %s", exc))
        except Exception:
            log.exception("could not send a dead letter from %s[%d]@%d", letter.topic, letter.partition,
                          letter.offset)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until what was sent is acknowledged (before committing the offsets past those records)."""
        if self._producer is not None:
            try:
                self._producer.flush(timeout=timeout_s)
            except Exception:
                log.exception("dead letters not flushed")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
