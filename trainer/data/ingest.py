"""Completions and feedback from Kafka into the store, on a thread of their own.

Each polled batch is parsed, stored in one SQLite transaction, and only then are the offsets of exactly
those records committed. A crash between the two re-delivers the batch on restart; the store ignores
what it already holds (events are keyed by id), so nothing is lost and nothing is counted twice.

kafka-python consumers are not thread-safe: the consumer is created, used and closed on the ingest thread.
"""

from __future__ import annotations

import logging
import threading

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from pydantic import BaseModel, ValidationError

from common.kafka import make_consumer
from common.settings import SharedSettings
from feedback.events import SCHEMA_VERSION, CompletionEvent, FeedbackEvent
from trainer import metrics
from trainer.data.store import DeadLetter, EventBatch, FeedbackStore
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 500  # also how long stop() may wait for the thread to notice
MAX_POLL_RECORDS = 500


def parse_batch(records: dict[TopicPartition, list[ConsumerRecord]], settings: SharedSettings) -> EventBatch:
    """Parse polled records by topic; what does not parse becomes a dead letter."""
    models: dict[str, type[BaseModel]] = {
        settings.completions_topic: CompletionEvent,
        settings.feedback_topic: FeedbackEvent,
    }
    batch = EventBatch()
    for partition, messages in records.items():
        model = models[partition.topic]
        for message in messages:
            try:
                event = _parse(model, message.value)
            except (ValidationError, ValueError) as exc:
                batch.dead_letters.append(
                    DeadLetter(partition.topic, partition.partition, message.offset, message.value, str(exc))
                )
                continue
            if isinstance(event, CompletionEvent):
                batch.completions.append(event)
            else:
                batch.feedback.append(event)
    return batch


def _parse(model: type[BaseModel], value: str | None) -> BaseModel:
    if value is None:
        raise ValueError("record has no value")
    event = model.model_validate_json(value)
    if event.schema_version != SCHEMA_VERSION:
        raise ValueError(f"schema_version {event.schema_version} is not the supported {SCHEMA_VERSION}")
    return event


def ingest_consumer(settings: TrainerSettings) -> KafkaConsumer:
    """The trainer's member of its consumer group, reading completions and feedback."""
    topics = [settings.completions_topic, settings.feedback_topic]
    return make_consumer(settings, topics, settings.group_id, group_instance_id=settings.group_instance_id)


class Ingestor:
    """start() the thread, stop() it; `error` holds what killed it, if anything did."""

    def __init__(self, settings: TrainerSettings, store: FeedbackStore):
        self._settings = settings
        self._store = store
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> Ingestor:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        consumer = None
        try:
            consumer = ingest_consumer(self._settings)
            fields = {"topics": sorted(consumer.subscription()), "group_id": self._settings.group_id,
                      "group_instance_id": self._settings.group_instance_id}  # fmt: skip
            log.info("ingest.started", extra={"fields": fields})
            while not self._stopping.is_set():
                records = consumer.poll(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_POLL_RECORDS)
                if records:
                    self._ingest(consumer, records)
        except (
            BaseException
        ) as exc:  # the loop checks `error` and shuts down; nothing was committed for this batch
            self.error = exc
            log.exception("ingest.failed")
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)
            log.info("ingest.stopped")

    def _ingest(self, consumer: KafkaConsumer, records: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        batch = parse_batch(records, self._settings)
        counts = self._store.save_batch(batch)
        metrics.count_stored(counts)
        offsets = {
            partition: OffsetAndMetadata(messages[-1].offset + 1, "", -1)
            for partition, messages in records.items()
        }
        try:
            consumer.commit(offsets)
        except KafkaError as exc:
            # Safe to go on: the batch is stored, and re-delivered records are ignored as duplicates.
            log.warning("ingest.commit_failed", extra={"fields": {"error": repr(exc)}})
        log.info(
            "ingest.batch",
            extra={
                "fields": {
                    "stored": dict(counts.stored),
                    "duplicates": counts.duplicates,
                    "dead_letters": counts.dead_letters,
                }
            },
        )
