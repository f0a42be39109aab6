"""Ingest against a real broker: events land in the store exactly once, also across a crash."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from common.kafka import ensure_topics, make_producer
from common.settings import SharedSettings
from tests.trainer.data.test_store import completion, feedback, ref
from trainer.data.ingest import Ingestor, ingest_consumer
from trainer.data.store import EventBatch, FeedbackStore
from trainer.settings import TrainerSettings

pytestmark = pytest.mark.kafka


def isolated_settings(kafka_settings: SharedSettings, tmp_path: Path, **fields) -> TrainerSettings:
    """Topics and consumer group of this test alone, on the session's broker."""
    run = uuid.uuid4().hex[:8]
    return TrainerSettings(
        kafka_bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
        topic_prefix=f"{kafka_settings.topic_prefix}{run}.",
        group_id=f"trainer-{run}",
        work_dir=tmp_path / "trainer",
        registry_dir=tmp_path / "registry",
        metrics_port=0,
        **fields,
    )


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def ingest_until(settings: TrainerSettings, store: FeedbackStore, condition, what: str) -> None:
    """Run the trainer's ingestor until `condition` holds; it must stop without an error."""
    ingestor = Ingestor(settings, store).start()
    try:
        wait_until(condition, what=what)
    finally:
        ingestor.stop()
    assert ingestor.error is None


def produce(settings: TrainerSettings, completions, feedback_events, raw_feedback: list[str] = ()) -> None:
    ensure_topics(settings, [settings.completions_topic, settings.feedback_topic])
    producer = make_producer(settings)
    for event in completions:
        producer.send(settings.completions_topic, key=event.completion_id, value=event)
    for event in feedback_events:
        producer.send(settings.feedback_topic, key=event.event_id, value=event)
    for value in raw_feedback:
        producer.send(settings.feedback_topic, value=value)
    producer.flush()
    producer.close()


def duplicates_so_far() -> float:
    return REGISTRY.get_sample_value("rlhf_trainer_duplicate_events_total") or 0.0


@pytest.fixture
def events():
    completions = [completion(f"c{i}", ["Yes.", "No."]) for i in range(10)]
    feedback_events = [feedback(type="thumbs", rating="up", **ref(f"c{i}")) for i in range(10)]
    feedback_events += [
        feedback(type="pairwise", a=ref(f"c{i}", 0), b=ref(f"c{i}", 1), preference="b") for i in range(10)
    ]
    return completions, feedback_events


def test_events_land_in_the_store_once_and_bad_records_in_dead_letters(kafka_settings, tmp_path, events):
    settings = isolated_settings(kafka_settings, tmp_path)
    completions, feedback_events = events
    # The first event twice, as a producer retry after a lost ack would send it.
    produce(
        settings,
        completions,
        feedback_events + feedback_events[:1],
        raw_feedback=['{"feedback": 1}', "no json"],
    )
    store = FeedbackStore(settings.store_path)
    ingest_until(settings, store, lambda: store.row_counts()["dead_letters"] == 2, what="every record to be stored")
    assert store.row_counts() == {"completions": 10, "feedback": 20, "dead_letters": 2, "rounds": 0}
    assert store.new_feedback_count() == 20

    # Offsets were committed: the same group, started again, reads only what was produced since.
    duplicates = duplicates_so_far()
    restarted = Ingestor(settings, store).start()
    produce(settings, [], [feedback(type="thumbs", rating="down", **ref("c0"))])
    try:
        wait_until(lambda: store.row_counts()["feedback"] == 21, what="the event produced after the restart")
    finally:
        restarted.stop()
    assert restarted.error is None
    assert duplicates_so_far() == duplicates
    store.close()


class SimulatedCrash(Exception):
    pass


class CrashingStore(FeedbackStore):
    """Dies in the first save, either before writing or after writing (before the offsets are committed)."""

    def __init__(self, path: Path, write_first: bool):
        super().__init__(path)
        self.write_first = write_first

    def save_batch(self, batch: EventBatch):
        if self.write_first:
            super().save_batch(batch)
        raise SimulatedCrash


@pytest.mark.parametrize("write_first", [False, True], ids=["crash-before-store", "crash-after-store"])
def test_a_crash_before_the_offset_commit_loses_nothing_and_counts_nothing_twice(
    kafka_settings, tmp_path, events, write_first
):
    settings = isolated_settings(kafka_settings, tmp_path)
    completions, feedback_events = events
    produce(settings, completions, feedback_events)

    crashing = CrashingStore(settings.store_path, write_first)
    crashed = Ingestor(settings, crashing).start()
    wait_until(lambda: not crashed.is_alive(), what="the simulated crash")
    assert isinstance(crashed.error, SimulatedCrash)
    stored = crashing.row_counts()
    crashing.close()
    # What the crashed run stored must come again, because its offsets were never committed.
    redelivered = stored["completions"] + stored["feedback"]
    assert redelivered > 0 if write_first else redelivered == 0

    duplicates = duplicates_so_far()
    store = FeedbackStore(settings.store_path)
    ingestor = Ingestor(settings, store).start()
    try:
        wait_until(
            lambda: (
                store.row_counts()["feedback"] == 20
                and store.row_counts()["completions"] == 10
                and duplicates_so_far() - duplicates == redelivered
            ),
            what="every event after the restart",
        )
        time.sleep(1)  # anything delivered a third time would have landed by now
    finally:
        ingestor.stop()
    assert ingestor.error is None
    assert store.row_counts() == {"completions": 10, "feedback": 20, "dead_letters": 0, "rounds": 0}
    assert store.new_feedback_count() == 20
    assert duplicates_so_far() - duplicates == redelivered
    store.close()


def test_a_trainer_stopped_while_joining_its_group_does_not_block_the_next(kafka_settings, tmp_path, events):
    """Tansu never expires a member that got its id and left before its join finished (Kafka does, after the
    session timeout). With dynamic membership (TRAINER_GROUP_INSTANCE_ID="") this test timed out: the next
    trainer read nothing in 30 s, and in a closed-loop run waited 11 minutes. The default is static."""
    settings = isolated_settings(kafka_settings, tmp_path)
    assert settings.group_instance_id
    completions, feedback_events = events
    produce(settings, completions, feedback_events)
    stopped_early = ingest_consumer(settings)
    stopped_early.poll(timeout_ms=50, max_records=1)  # the first join round trip, not the whole join
    stopped_early.close(autocommit=False)

    store = FeedbackStore(settings.store_path)
    ingest_until(settings, store, lambda: store.row_counts()["feedback"] == 20, what="the next trainer to read")
    store.close()
