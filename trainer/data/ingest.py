"""Completions and feedback from Kafka into the store, on a thread of their own.

Each polled batch is parsed, stored in one SQLite transaction, and only then are the offsets of exactly
those records committed. A record that does not parse is kept in the store's dead-letter table and sent to
the dead-letter topic (common/dead_letters.py) before its offset is committed; it never stops the thread. A crash between the two re-delivers the batch on restart; the store ignores
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

from common.dead_letters import DeadLetter, DeadLetterProducer, parse_record
from common.kafka import make_consumer
from common.settings import SharedSettings
from feedback.events import CompletionEvent, FeedbackEvent
from trainer import metrics
from trainer.data.store import EventBatch, FeedbackStore
from trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 500  # also how long stop() may wait for the thread to notice
MAX_POLL_RECORDS = 500


def parse_batch(records: dict[TopicPartition, list[ConsumerRecord]], settings: SharedSettings) -> EventBatch:
    """Parse polled records by topic; what does not parse becomes a dead letter."""
    models = {settings.completions_topic: CompletionEvent, settings.feedback_topic: FeedbackEvent}
    batch = EventBatch()
    for partition, messages in records.items():
        parse = models[partition.topic].model_validate_json
        for message in messages:
            match parse_record(message, parse, consumer="trainer"):
                case DeadLetter() as letter:
                    batch.dead_letters.append(letter)
                case CompletionEvent() as event:
                    batch.completions.append(event)
                case event:
                    batch.feedback.append(event)
    return batch


def ingest_consumer(settings: TrainerSettings) -> KafkaConsumer:
    """The trainer's member of its consumer group, reading completions and feedback."""
    topics = [settings.completions_topic, settings.feedback_topic]
    return make_consumer(settings, topics, settings.group_id, group_instance_id=settings.group_instance_id)


class Ingestor:
    """start() the thread, stop() it; `error` holds what killed it, if anything did."""

    def __init__(self, settings: TrainerSettings, store: FeedbackStore):
        self._settings = settings
        self._store = store
        self._dead_letters = DeadLetterProducer(settings)
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
            self._dead_letters.close()
            log.info("ingest.stopped")

    def _ingest(self, consumer: KafkaConsumer, records: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        batch = parse_batch(records, self._settings)
        counts = self._store.save_batch(batch)
        metrics.count_stored(counts)
        for letter in batch.dead_letters:
            self._dead_letters.send(letter)
        self._dead_letters.flush()
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
