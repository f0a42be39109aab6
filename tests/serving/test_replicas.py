"""Two serving replicas on one real broker, started from one directory (so sharing its completion id key
and its registry): feedback on an answer either served reaches the feedback topic through the other, or
through a replica restarted in between, and counts in the other's canary trial; an id neither issued is
refused by both."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from common.registry import PolicyRegistry
from feedback import FeedbackEvent
from serving.app import build_app
from serving.canary import CanaryConfig
from serving.completion_ids import CompletionIds
from serving.event_log import KafkaEventLog
from serving.settings import ServingSettings
from tests.adapters import fake_base_model
from tests.serving.fakes import FakeEngine
from tests.serving.test_kafka_integration import read_topic
from tests.serving.test_policy import publish_fake_adapter

pytestmark = pytest.mark.kafka

USER = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def settings(kafka_settings, tmp_path, request) -> ServingSettings:
    return ServingSettings(
        kafka_bootstrap_servers=kafka_settings.kafka_bootstrap_servers,
        topic_prefix=f"{kafka_settings.topic_prefix}{request.node.name}.",  # topics of its own
        registry_dir=tmp_path / "registry", completion_key_file=tmp_path / "completion-key",
        follow_policy_topic=False,
    )


def replica(settings: ServingSettings, spool_dir: Path) -> TestClient:
    """A replica with its own spool (a replica's own disk), sharing the directory that holds the key."""
    app = build_app(settings, FakeEngine,
                    lambda: KafkaEventLog(settings, spool_dir, queue_size=100, ack_timeout_s=10))
    return TestClient(app, raise_server_exceptions=False)


def serve(client: TestClient, **extra) -> str:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def thumbs(client: TestClient, completion_id: str, choice_index: int = 0, rating: str = "up"):
    return client.post("/v1/feedback", json={"type": "thumbs", "completion_id": completion_id,
                                             "choice_index": choice_index, "rating": rating})


def feedback_on_topic(settings: ServingSettings, expected: int) -> dict[str, FeedbackEvent]:
    records = read_topic(settings, settings.feedback_topic, expected)
    return {record.key: FeedbackEvent.model_validate_json(record.value) for record in records}


def test_feedback_reaches_the_other_replica(settings, tmp_path):
    with replica(settings, tmp_path / "spool-1") as one, replica(settings, tmp_path / "spool-2") as two:
        served_by_one, served_by_two = serve(one, n=2), serve(two, ab=True)
        accepted = [thumbs(two, served_by_one, choice_index=1), thumbs(one, served_by_two, choice_index=1)]
        assert [r.status_code for r in accepted] == [202, 202], [r.text for r in accepted]
        assert thumbs(two, served_by_one, choice_index=2).status_code == 400  # n=2: no third choice

    arrived = feedback_on_topic(settings, 2)
    assert {key: event.event_id for key, event in arrived.items()} == {
        served_by_one: accepted[0].json()["id"], served_by_two: accepted[1].json()["id"]}
    assert arrived[served_by_one].feedback.choice_index == 1


def test_a_restarted_replica_accepts_feedback_on_what_it_served_before(settings, tmp_path):
    with replica(settings, tmp_path / "spool") as before:
        served = serve(before)
    with replica(settings, tmp_path / "spool") as after:  # a new process in all but name: nothing carried over in memory
        response = thumbs(after, served)
    assert response.status_code == 202, response.text
    assert feedback_on_topic(settings, 1)[served].event_id == response.json()["id"]


def test_an_id_no_replica_issued_is_refused_by_both(settings, tmp_path):
    with replica(settings, tmp_path / "spool-1") as one, replica(settings, tmp_path / "spool-2") as two:
        genuine = serve(one)
        forged_key = CompletionIds("f" * 32).issue(["v0"])
        tampered = genuine[:-1] + ("A" if genuine[-1] != "A" else "B")
        for client in (one, two):
            for completion_id in (forged_key, tampered, "chatcmpl-nope"):
                response = thumbs(client, completion_id)
                assert response.status_code == 404, response.text
                assert response.json()["error"]["param"] == "completion_id"
        assert thumbs(two, genuine).status_code == 202
    assert list(feedback_on_topic(settings, 1)) == [genuine]


def test_a_canary_counts_feedback_on_answers_the_other_replica_served(settings, tmp_path):
    """A load balancer sends a user's feedback to either replica: each replica's trial counts it."""
    settings = settings.model_copy(update={
        "base_model": fake_base_model(),  # what the fake adapter fits
        "canary": CanaryConfig(fraction=0.5, min_seconds=0, check_interval_s=3600)})  # reviewed only when asked
    publish_fake_adapter(PolicyRegistry(settings.registry_dir), tmp_path)
    with replica(settings, tmp_path / "spool-1") as one, replica(settings, tmp_path / "spool-2") as two:
        for client in (one, two):
            client.portal.call(client.app.state.policies.offer, "v1")
        served = Counter()
        while min(served["v0"], served["v1"]) < 3:  # replica 1 serves both arms; users like v1 only
            response = one.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
            version = response.headers["x-policy-version"]
            served[version] += 1
            rating = "up" if version == "v1" else "down"
            assert thumbs(two, response.json()["id"], rating=rating).status_code == 202
        pinned = serve(one, model="rlhf-policy@v1")  # pinned: no evidence on either replica
        assert thumbs(two, pinned, rating="down").status_code == 202
        figures = [client.get("/v1/admin/policy").json()["canary"]["figures"] for client in (one, two)]

    # Replica 2 counts the ratings (not the requests); replica 1 the requests (not the ratings).
    assert {k: figures[1][k] for k in ("canary_requests", "canary_ratings", "canary_approvals",
                                       "baseline_requests", "baseline_ratings", "baseline_approvals")} == {
        "canary_requests": 0, "canary_ratings": served["v1"], "canary_approvals": served["v1"],
        "baseline_requests": 0, "baseline_ratings": served["v0"], "baseline_approvals": 0}
    assert (figures[0]["canary_requests"], figures[0]["baseline_requests"]) == (served["v1"], served["v0"])
    assert figures[0]["canary_ratings"] == figures[0]["baseline_ratings"] == 0
