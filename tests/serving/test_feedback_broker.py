"""Idempotent feedback against the real broker: a retry with the same key puts one event on the topic, and
the same key sent to two replicas puts two events with one id there, of which the trainer stores one."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient

from serving.app import build_app
from serving.event_log import KafkaEventLog
from serving.settings import ServingSettings
from tests.feedback.topics import whole_topic
from tests.serving.fakes import FakeEngine
from trainer.data.ingest import parse_batch
from trainer.data.store import EventBatch, FeedbackStore

pytestmark = pytest.mark.kafka

USER = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def settings(kafka_settings, tmp_path) -> ServingSettings:
    return ServingSettings(kafka_bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
                           topic_prefix=f"{kafka_settings.topic_prefix}{uuid.uuid4().hex[:8]}.",
                           registry_dir=tmp_path / "registry", follow_policy_topic=False,
                           completion_key="k" * 32)


def replica(settings: ServingSettings, spool_dir) -> TestClient:
    replica_settings = settings.model_copy(update={"spool_dir": spool_dir})
    app = build_app(replica_settings, FakeEngine, lambda: KafkaEventLog.from_settings(replica_settings))
    return TestClient(app, raise_server_exceptions=False)


def test_a_retry_with_the_same_key_yields_one_event_on_the_topic(settings, tmp_path):
    with replica(settings, tmp_path / "spool") as client:
        completion_id = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).json()["id"]
        body = {"type": "thumbs", "completion_id": completion_id, "rating": "up"}
        answers = [client.post("/v1/feedback", json=body, headers={"Idempotency-Key": "once"}) for _ in range(5)]
        other = client.post("/v1/feedback", json=body)  # no key: its own event
    assert [a.status_code for a in answers] == [202] * 5 and len({a.json()["id"] for a in answers}) == 1
    events = parse_batch(whole_topic(settings, settings.feedback_topic), settings).feedback
    assert sorted(e.event_id for e in events) == sorted([answers[0].json()["id"], other.json()["id"]])


def test_a_retry_on_another_replica_is_stored_once_by_the_trainer(settings, tmp_path):
    with replica(settings, tmp_path / "spool-1") as one, replica(settings, tmp_path / "spool-2") as two:
        completion_id = one.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).json()["id"]
        body = {"type": "rating", "completion_id": completion_id, "score": 6, "event_id": "client-event-1"}
        first, retry = one.post("/v1/feedback", json=body), two.post("/v1/feedback", json=body)
    assert first.status_code == retry.status_code == 202 and first.json()["id"] == retry.json()["id"]
    batch = parse_batch(whole_topic(settings, settings.feedback_topic), settings)
    assert [e.event_id for e in batch.feedback] == [first.json()["id"]] * 2  # each replica sent its own
    store = FeedbackStore(tmp_path / "store.sqlite3")
    counts = store.save_batch(EventBatch(feedback=batch.feedback))
    assert (sum(counts.stored.values()), counts.duplicates, store.row_counts()["feedback"]) == (1, 1, 1)
    store.close()
