"""The canary: its statistics by hand, then through the app on the fake engine (share, rollback on bad
ratings and on failures, promotion, operator verdicts, verdicts surviving a restart)."""

from __future__ import annotations

import math
import uuid
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from common.registry import BASE_POLICY, PROMOTED, ROLLED_BACK, PolicyRegistry, PolicyVersion
from feedback import parse_feedback
from serving.app import build_app
from serving.canary import ArmStats, CanaryConfig, CanaryTrial, approval, approval_z
from serving.settings import ServingSettings
from tests.serving.test_policy import publish_fake_adapter

USER = [{"role": "user", "content": "Hello"}]
CANARY_V1 = PolicyVersion(number=1, path=None, manifest={"version": "v1"})


def trial(**config) -> CanaryTrial:
    defaults = dict(fraction=0.5, min_requests=20, min_seconds=0, min_ratings=10, max_seconds=3600)
    return CanaryTrial(baseline=BASE_POLICY, canary=CANARY_V1, config=CanaryConfig(**{**defaults, **config}))


def feed(t: CanaryTrial, version: str, requests: int = 0, failures: int = 0, ups: int = 0, downs: int = 0):
    for i in range(requests):
        t.observe_request(version, failed=i < failures)
    for approved in [True] * ups + [False] * downs:
        t.observe_rating(version, approved)


def test_approval_of_each_kind_of_feedback():
    ref = {"completion_id": "c"}
    assert approval(parse_feedback({"type": "thumbs", "rating": "up", **ref})) is True
    assert approval(parse_feedback({"type": "thumbs", "rating": "down", **ref})) is False
    assert [approval(parse_feedback({"type": "rating", "score": s, **ref})) for s in range(1, 8)] == [
        False, False, False, None, True, True, True]
    assert approval(parse_feedback({"type": "correction", "text": "better", **ref})) is None


def test_approval_z_by_hand():
    # 10/40 against 30/40: pooled p = 0.5, se = sqrt(0.25 * (1/40 + 1/40)) = 0.1118, z = -0.5 / 0.1118.
    z = approval_z(ArmStats(ratings=40, approvals=10), ArmStats(ratings=40, approvals=30))
    assert z == pytest.approx(-4.4721, abs=1e-4)
    # 18/20 against 36/40: equal rates.
    assert approval_z(ArmStats(ratings=20, approvals=18), ArmStats(ratings=40, approvals=36)) == 0.0
    # All approve on both sides: no variance, no evidence.
    assert approval_z(ArmStats(ratings=5, approvals=5), ArmStats(ratings=9, approvals=9)) == 0.0


def test_rollback_on_approval_needs_enough_ratings_and_a_clear_gap():
    t = trial()
    feed(t, "v1", requests=30, ups=2, downs=7)  # 9 ratings: under min_ratings
    feed(t, "v0", requests=30, ups=9, downs=1)
    assert t.verdict() is None
    feed(t, "v1", ups=0, downs=1)
    verdict = t.verdict()
    # 2/10 against 9/10: pooled 0.55, se = sqrt(0.2475 * 0.2) = 0.2225, z = -0.7 / 0.2225 = -3.15.
    assert verdict.verdict == ROLLED_BACK and "z = -3.15" in verdict.reason
    # A smaller gap with the same ratings is within noise at 2.33: 5/10 against 9/10 gives z = -2.06.
    close = trial()
    feed(close, "v1", requests=10, ups=5, downs=5)
    feed(close, "v0", requests=10, ups=9, downs=1)
    assert close.verdict() is None


def test_rollback_on_failures_beyond_the_baselines():
    t = trial(min_requests=1000)
    feed(t, "v1", requests=20, failures=2)
    feed(t, "v0", requests=100)
    assert t.verdict() is None  # 2 failures: under min_failures
    feed(t, "v1", requests=1, failures=1)
    assert t.verdict().verdict == ROLLED_BACK
    # The same failures while the baseline fails as often are not the canary's doing.
    both = trial(min_requests=1000)
    feed(both, "v1", requests=20, failures=3)
    feed(both, "v0", requests=20, failures=3)
    assert both.verdict() is None


def test_promotion_needs_requests_time_and_ratings_or_the_longest_wait():
    t = trial(min_seconds=60, max_seconds=600)
    feed(t, "v1", requests=19, ups=10)
    feed(t, "v0", requests=50, ups=10)
    assert t.verdict(now=t.started_at + 100) is None  # 19 requests
    feed(t, "v1", requests=1)
    assert t.verdict(now=t.started_at + 30) is None  # too early
    assert t.verdict(now=t.started_at + 61).verdict == PROMOTED
    unrated = trial(min_seconds=60, max_seconds=600)
    feed(unrated, "v1", requests=50, ups=3)
    feed(unrated, "v0", requests=50, ups=3)
    assert unrated.verdict(now=unrated.started_at + 599) is None
    assert "too few ratings" in unrated.verdict(now=unrated.started_at + 601).reason


def test_evidence_about_other_versions_is_ignored():
    t = trial()
    feed(t, "v7", requests=50, failures=50, downs=50)
    assert t.arms["canary"] == ArmStats() == t.arms["baseline"]


def test_routing_share_and_sticky_users():
    t = trial(fraction=0.1)
    users = [uuid.uuid4().hex for _ in range(10_000)]
    share = sum(t.takes(u) for u in users) / len(users)
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(users))  # 4 standard errors: 0.012
    assert all(t.takes(u) == t.takes(u) for u in users[:100])
    anonymous = sum(t.takes(None) for _ in range(10_000)) / 10_000
    assert abs(anonymous - 0.1) < 0.012


def test_settings_read_the_canary_from_the_environment(monkeypatch):
    monkeypatch.setenv("SERVING_CANARY__FRACTION", "0.3")
    monkeypatch.setenv("SERVING_CANARY__MIN_RATINGS", "7")
    canary = ServingSettings().canary
    assert (canary.fraction, canary.min_ratings, canary.min_requests) == (0.3, 7, 200)


# --- Through the app ------------------------------------------------------------------------------


@pytest.fixture
def canary_settings(settings) -> ServingSettings:
    config = CanaryConfig(fraction=0.5, min_requests=30, min_seconds=0, min_ratings=10, max_seconds=3600,
                          check_interval_s=3600)  # reviews run when the test says so
    return settings.model_copy(update={"canary": config})


@pytest.fixture
def app_client(canary_settings, engine, events):
    def start() -> TestClient:
        return TestClient(build_app(canary_settings, lambda: engine, lambda: events), raise_server_exceptions=False)

    return start


def chat(client, **body) -> tuple[str, str]:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, **body})
    return response.headers.get("x-policy-version"), response.json().get("id")


def thumbs(client, completion_id: str, rating: str) -> None:
    response = client.post("/v1/feedback", json={"type": "thumbs", "completion_id": completion_id, "rating": rating})
    assert response.status_code == 202, response.text


def review(client) -> dict:
    client.portal.call(client.app.state.policies.review)
    return client.get("/v1/admin/policy").json()


def test_a_published_version_takes_its_share_and_ratings_roll_it_back(app_client, canary_settings, engine,
                                                                     events, tmp_path):
    registry = PolicyRegistry(canary_settings.registry_dir)
    with app_client() as client:
        publish_fake_adapter(registry, tmp_path)
        client.portal.call(client.app.state.policies.offer, "v1")
        assert engine.loaded == ["v1"]
        served = Counter()
        for _ in range(40):
            version, completion_id = chat(client)
            served[version] += 1
            thumbs(client, completion_id, "up" if version == "v0" else "down")  # users dislike v1
            if served["v0"] >= 10 and served["v1"] >= 10:
                break
        # Fraction 0.5: both arms served; the canary is still on (reviews run only when called).
        state = client.get("/v1/admin/policy").json()
        assert state["current"] == "v0" and state["canary"]["version"] == "v1"
        assert state["canary"]["figures"]["canary_requests"] == served["v1"]
        assert state["canary"]["figures"]["canary_approvals"] == 0
        assert state["canary"]["figures"]["baseline_approvals"] == served["v0"]

        state = review(client)
        assert state["canary"] is None and state["current"] == "v0" and state["rolled_back"] == ["v1"]
        assert {chat(client)[0] for _ in range(20)} == {"v0"}
        [event] = events.announced
        assert (event.version, event.action) == ("v1", "rolled_back") and "approval 0/" in event.reason
        assert 'rlhf_canary_verdicts_total{verdict="rolled_back"} 1.0' in client.get("/metrics").text
    assert registry.get("v1").rolled_back

    # A restart does not bring the rolled-back version back.
    with app_client() as client:
        state = client.get("/v1/admin/policy").json()
        assert (state["current"], state["canary"]) == ("v0", None)


def test_a_canary_as_liked_as_the_current_version_is_promoted(app_client, canary_settings, events, tmp_path):
    registry = PolicyRegistry(canary_settings.registry_dir)
    with app_client() as client:
        publish_fake_adapter(registry, tmp_path)
        client.portal.call(client.app.state.policies.offer, "v1")
        served = Counter()
        while served["v1"] < 30 or served["v0"] < 10:
            version, completion_id = chat(client)
            served[version] += 1
            thumbs(client, completion_id, "up")
            if served["v1"] < 30:
                assert review(client)["canary"] is not None
        state = review(client)
        assert (state["current"], state["canary"]) == ("v1", None)
        assert {chat(client)[0] for _ in range(20)} == {"v1"}
        assert [(e.version, e.action) for e in events.announced] == [("v1", "promoted")]
    assert registry.get("v1").promoted and registry.get("v1").verdict["figures"]["canary_requests"] == served["v1"]
    with app_client() as client:  # after a restart the promoted version serves all traffic
        assert client.get("/v1/admin/policy").json()["current"] == "v1"


def test_a_failing_canary_is_rolled_back(app_client, canary_settings, engine, tmp_path):
    publish_fake_adapter(PolicyRegistry(canary_settings.registry_dir), tmp_path)
    engine.failing_versions = {"v1"}
    with app_client() as client:
        client.portal.call(client.app.state.policies.offer, "v1")
        statuses = Counter()
        while statuses[500] < 3:
            statuses[client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).status_code] += 1
        assert review(client)["rolled_back"] == ["v1"]
        assert {chat(client)[0] for _ in range(10)} == {"v0"}


def test_a_new_version_at_start_up_goes_into_canary(app_client, canary_settings, tmp_path):
    registry = PolicyRegistry(canary_settings.registry_dir)
    publish_fake_adapter(registry, tmp_path)
    registry.record_verdict("v1", PROMOTED, "earlier", {})
    publish_fake_adapter(registry, tmp_path)
    with app_client() as client:
        state = client.get("/v1/admin/policy").json()
        assert (state["current"], state["canary"]["version"], state["canary"]["baseline"]) == ("v1", "v2", "v1")
        # A user stays on one arm for the whole trial.
        for user in ("alice", "bob", "carol"):
            assert len({chat(client, user=user)[0] for _ in range(10)}) == 1
        # Pinning a version asks for that version whatever the canary.
        assert {chat(client, model="rlhf-policy@v1")[0] for _ in range(10)} == {"v1"}


def test_operators_conclude_or_supersede_a_canary(app_client, canary_settings, events, tmp_path):
    registry = PolicyRegistry(canary_settings.registry_dir)
    with app_client() as client:
        assert client.post("/v1/admin/canary", json={"verdict": "promoted"}).status_code == 409
        publish_fake_adapter(registry, tmp_path), publish_fake_adapter(registry, tmp_path)
        policies = client.app.state.policies
        client.portal.call(policies.offer, "v1")
        client.portal.call(policies.offer, "v2")  # a newer version supersedes v1's trial
        client.portal.call(policies.offer, "v1")  # and an older one is not tried again
        assert client.get("/v1/admin/policy").json()["canary"]["version"] == "v2"
        response = client.post("/v1/admin/canary", json={"verdict": "promoted", "reason": "looks right"})
        assert response.status_code == 200 and response.json()["current"] == "v2"
        assert registry.get("v2").verdict["reason"] == "looks right" and registry.get("v1").verdict is None
        assert client.post("/v1/admin/canary", json={"verdict": "maybe"}).status_code == 400
        publish_fake_adapter(registry, tmp_path)
        client.portal.call(policies.offer, "v3")
        assert client.post("/v1/admin/policy", json={"version": "v1"}).json()["canary"] is None  # a pin ends it
    assert [(e.version, e.action) for e in events.announced] == [("v2", "promoted")]
