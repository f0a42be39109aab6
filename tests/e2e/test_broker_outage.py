"""A broker outage in the middle of a chat-and-feedback stream loses nothing that was answered 2xx.

Real parts: Tansu on an S3 store (it keeps its data across a restart), the serving app with its real event
log and spool, the trainer's ingestor and store. Only the engine is a fake. The broker is stopped for longer
than the producer's delivery window while clients keep chatting and rating; the replica is restarted during
the outage, and once the broker is back a copy of its spool, taken before the replay, is replayed by another
replica (a crash after delivery, before the spool's cursor moved): the topics then hold duplicates, and the
trainer must store each event once and join every piece of feedback to its completion.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from common.settings import SharedSettings
from feedback import CompletionEvent, FeedbackEvent
from serving.app import build_app
from serving.event_log import KafkaEventLog
from serving.settings import ServingSettings
from tests.durable_broker import durable_broker, skip_on_external_cluster
from tests.feedback.topics import whole_topic
from tests.serving.fakes import FakeEngine
from tests.trainer.data.test_ingest import ingest_until, isolated_settings, wait_until
from trainer.data.store import FeedbackStore

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ACK_TIMEOUT_S = 1.0  # the producer's delivery window


class Stream:
    """Clients chatting and rating what they got: thumbs on single answers, a pairwise choice on pairs."""

    def __init__(self):
        self.completion_ids: list[str] = []
        self.feedback_ids: list[str] = []

    def chat_and_rate(self, client: TestClient, rounds: int) -> None:
        for i in range(rounds):
            n = 2 if i % 3 == 0 else 1
            chat = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"question {len(self.completion_ids)}"}],
                "max_tokens": 3, "n": n})
            assert chat.status_code == 200, chat.text
            completion_id = chat.json()["id"]
            self.completion_ids.append(completion_id)
            if n == 2:
                body = {"type": "pairwise", "preference": "a", "a": {"completion_id": completion_id},
                        "b": {"completion_id": completion_id, "choice_index": 1}}
            else:
                body = {"type": "thumbs", "completion_id": completion_id, "rating": "up"}
            rated = client.post("/v1/feedback", json=body)
            assert rated.status_code == 202, rated.text
            self.feedback_ids.append(rated.json()["id"])


def replica(settings: ServingSettings, spool_dir: Path) -> TestClient:
    replica_settings = settings.model_copy(update={"spool_dir": spool_dir})
    app = build_app(replica_settings, FakeEngine, lambda: KafkaEventLog.from_settings(replica_settings))
    return TestClient(app, raise_server_exceptions=False)


def spooled_records() -> float:
    return REGISTRY.get_sample_value("rlhf_spool_records") or 0.0


def test_an_outage_loses_no_completion_and_no_feedback(tmp_path):
    skip_on_external_cluster()
    with durable_broker(tmp_path / "tansu.log") as broker:
        trainer = isolated_settings(SharedSettings(kafka_bootstrap_servers=broker.bootstrap_servers), tmp_path)
        settings = ServingSettings(
            kafka_bootstrap_servers=broker.bootstrap_servers, topic_prefix=trainer.topic_prefix,
            registry_dir=tmp_path / "registry", follow_policy_topic=False, completion_key="k" * 32,
            feedback_ack_timeout_s=ACK_TIMEOUT_S,
        )
        stream = Stream()
        with replica(settings, tmp_path / "spool") as client:
            stream.chat_and_rate(client, 10)
            broker.stop()
            stream.chat_and_rate(client, 10)
            time.sleep(2 * ACK_TIMEOUT_S)  # the outage outlasts the producer's delivery window
            stream.chat_and_rate(client, 10)
            assert spooled_records() > 0
        # The replica restarted while the broker is down; a copy of its spool stands for a crash after the
        # replay below delivered it but before the cursor moved.
        shutil.copytree(tmp_path / "spool", tmp_path / "spool-copy", ignore=shutil.ignore_patterns("lock"))
        broker.start()
        with replica(settings, tmp_path / "spool") as client:  # replays its spool
            stream.chat_and_rate(client, 10)
            wait_until(lambda: spooled_records() == 0, timeout_s=60, what="the spool to be replayed")
        with replica(settings, tmp_path / "spool-copy"):  # replays the same records again
            wait_until(lambda: spooled_records() == 0, timeout_s=60, what="the copy to be replayed")

        completions = Counter(CompletionEvent.model_validate_json(r.value).completion_id
                              for batch in whole_topic(settings, settings.completions_topic).values() for r in batch)
        feedback = Counter(FeedbackEvent.model_validate_json(r.value).event_id
                           for batch in whole_topic(settings, settings.feedback_topic).values() for r in batch)
        assert set(completions) == set(stream.completion_ids)  # at least once
        assert set(feedback) == set(stream.feedback_ids)
        assert max(feedback.values()) > 1 and max(completions.values()) > 1  # the copy's replay: duplicates

        store = FeedbackStore(trainer.store_path)
        ingest_until(trainer, store, lambda: store.row_counts()["feedback"] == len(stream.feedback_ids)
                     and store.row_counts()["completions"] == len(stream.completion_ids), what="every event")
        counts = store.row_counts()
        assert (counts["completions"], counts["feedback"]) == (40, 40)  # exactly once by id
        joined = store.training_snapshot().feedback_ids  # feedback whose completions are all stored
        assert sorted(joined) == sorted(stream.feedback_ids)
        store.close()
