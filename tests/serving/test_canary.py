"""The canary: its statistics by hand, then through the app on the fake engine (share, rollback on bad
ratings and on failures, promotion, operator verdicts, verdicts surviving a restart)."""

from __future__ import annotations

import math
import random
import uuid
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from common.registry import BASE_POLICY, PROMOTED, ROLLED_BACK, PolicyRegistry, PolicyVersion
from feedback import parse_feedback
from serving.app import build_app
from serving.canary import (
    ArmStats,
    CanaryConfig,
    CanaryTrial,
    HeadToHead,
    Verdict,
    approval,
    approval_evidence,
    preference_evidence,
    preferred_first,
)
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


def test_approval_evidence_by_hand():
    # 10/40 against 30/40: pooled p = 0.5, V = 0.25 * (1/40 + 1/40) = 0.0125, diff = -0.5, tau^2 = 0.04:
    # sqrt(0.0125 / 0.0525) = 0.48795; exp(0.25 * 0.04 / (2 * 0.0125 * 0.0525)) = exp(7.6190) = 2036.6.
    difference, ratio = approval_evidence(ArmStats(ratings=40, approvals=10), ArmStats(ratings=40, approvals=30),
                                          tau=0.2)
    assert difference == -0.5 and ratio == pytest.approx(993.77, abs=0.01)
    # Equal rates: the ratio is sqrt(V / (V + tau^2)) < 1, evidence for "no difference".
    _, equal = approval_evidence(ArmStats(ratings=20, approvals=18), ArmStats(ratings=40, approvals=36), tau=0.2)
    # Pooled p = 0.9, V = 0.09 * (1/20 + 1/40) = 0.00675.
    assert equal == pytest.approx(math.sqrt(0.00675 / 0.04675), abs=1e-9)
    # All approve on both sides: no variance, no evidence.
    assert approval_evidence(ArmStats(ratings=5, approvals=5), ArmStats(ratings=9, approvals=9), tau=0.2) == (0, 1)


def test_rollback_on_approval_needs_a_likelihood_ratio_of_one_over_alpha():
    t = trial()
    feed(t, "v1", requests=40, ups=15, downs=25)
    feed(t, "v0", requests=40, ups=28, downs=12)
    # 15/40 against 28/40: ratio 12.5, under 1 / 0.01; 32 points below, so no promotion either.
    assert t.verdict(now=t.started_at + 3000) is None
    feed(t, "v0", ups=2)
    feed(t, "v1", downs=5)  # 15/45 against 30/42: ratio 63.7
    assert t.verdict() is None
    feed(t, "v0", ups=2)
    feed(t, "v1", downs=5)  # 15/50 against 32/44: ratio 390
    verdict = t.verdict()
    assert verdict.verdict == ROLLED_BACK and "15/50" in verdict.reason and "ratio 390" in verdict.reason
    # The canary doing better is never a reason to roll it back.
    better = trial(min_requests=1000)
    feed(better, "v1", requests=40, ups=30, downs=10)
    feed(better, "v0", requests=40, ups=10, downs=30)
    assert better.verdict() is None


def run_canaries(canary_rate: float, trials: int, ratings: int, rolled_back, seed: int = 0) -> list[int]:
    """Canaries whose arms get one rating each in turn, judged after every one; the rating count at which
    each was rolled back (an empty list: none was)."""
    rolled = []
    for i in range(trials):
        rng = random.Random(f"{seed}/{i}")  # a trial's ratings do not depend on when the one before it ended
        t = trial(min_requests=10**9)
        for n in range(1, ratings + 1):
            t.observe_rating("v1", rng.random() < canary_rate)
            t.observe_rating("v0", rng.random() < 0.7)
            if rolled_back(t):
                rolled.append(n)
                break
    return rolled


def test_weighing_after_every_rating_keeps_false_rollbacks_under_alpha():
    """A canary as good as its baseline (approval 0.7 both), 1,000 ratings a side, judged after each."""
    trials = 300
    ours = run_canaries(0.7, trials, 1000, lambda t: t.verdict() is not None)

    def fixed_z_test(t: CanaryTrial) -> bool:  # what a one-look test at the 1% level does when peeked at
        c, b = t.arms["canary"], t.arms["baseline"]
        if min(c.ratings, b.ratings) < 50:
            return False
        pooled = (c.approvals + b.approvals) / (c.ratings + b.ratings)
        se = math.sqrt(pooled * (1 - pooled) * (1 / c.ratings + 1 / b.ratings))
        return se > 0 and (c.approval_rate - b.approval_rate) / se < -2.33

    naive = run_canaries(0.7, trials, 1000, fixed_z_test)
    print(f"false rollbacks of {trials}: mSPRT {len(ours)}, fixed z-test peeked at {len(naive)}")
    assert len(ours) / trials <= 0.02  # alpha = 0.01; measured 0.7% in a 2,000-rating simulation
    assert len(naive) > 2 * max(len(ours), 1)


def test_comparisons_weighed_after_each_one_stay_under_alpha_and_catch_a_less_preferred_canary():
    def run(canary_preferred: float, trials: int) -> list[int]:
        rolled = []
        for i in range(trials):
            rng, t = random.Random(f"h2h/{canary_preferred}/{i}"), trial(min_requests=10**9)
            for n in range(1, 1001):
                t.observe_choice(*(("v1", "v0") if rng.random() < canary_preferred else ("v0", "v1")))
                if t.verdict() is not None:
                    rolled.append(n)
                    break
        return sorted(rolled)

    equal, worse = run(0.5, 300), run(0.35, 100)
    print(f"comparisons: {len(equal)} of 300 equal canaries rolled back; canaries preferred 35% of the time: "
          f"{len(worse)} of 100, median after {worse[len(worse) // 2]} comparisons")
    assert len(equal) / 300 <= 0.02 and len(worse) == 100


def test_a_worse_canary_is_caught():
    caught = run_canaries(0.5, 100, 1000, lambda t: t.verdict() is not None, seed=1)
    caught.sort()
    print(f"0.5 against 0.7 approval: rolled back {len(caught)} of 100, median after {caught[50]} ratings a side")
    assert len(caught) == 100 and caught[50] < 400  # measured 135 in simulation


def test_direct_comparisons_by_hand():
    pair = {"a": {"completion_id": "c1"}, "b": {"completion_id": "c2"}}
    assert [preferred_first(parse_feedback({"type": "pairwise", "preference": p, **pair})) for p in "ab"] == [
        (0, 1), (1, 0)]
    assert preferred_first(parse_feedback({"type": "pairwise", "preference": "tie", **pair})) is None
    assert preferred_first(parse_feedback({"type": "ranking", "ranked": [pair["a"], pair["b"]]})) is None
    # 10 wins of 40: diff = -0.25, V = 0.25 / 40 = 0.00625, tau^2 = 0.04: sqrt(0.00625 / 0.04625) = 0.36761,
    # exp(0.0625 * 0.04 / (2 * 0.00625 * 0.04625)) = exp(4.3243) = 75.53.
    difference, ratio = preference_evidence(HeadToHead(comparisons=40, canary_wins=10), tau=0.2)
    assert difference == -0.25 and ratio == pytest.approx(27.76, abs=0.01)
    t = trial(min_requests=1000)
    for i in range(40):
        t.observe_choice(*(("v1", "v0") if i < 10 else ("v0", "v1")))
    t.observe_choice("v7", "v0")  # a comparison with another version says nothing about the canary
    assert t.head_to_head == HeadToHead(comparisons=40, canary_wins=10) and t.verdict() is None  # 27.8 < 200
    for i in range(20):
        t.observe_choice(*(("v1", "v0") if i < 5 else ("v0", "v1")))
    verdict = t.verdict()  # 15 of 60: ratio 273.7
    assert verdict.verdict == ROLLED_BACK and "15 of 60 direct comparisons" in verdict.reason


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
    assert unrated.verdict(now=unrated.started_at + 601) == Verdict(
        PROMOTED, "50 requests in 601 s, nothing against it (approval 3/3 against the baseline's 3/3)")
    # A quiet deployment: 5 requests in the longest wait, no ratings, nothing against it.
    quiet = trial(min_seconds=60, max_seconds=600)
    feed(quiet, "v1", requests=5)
    assert quiet.verdict(now=quiet.started_at + 599) is None
    assert quiet.verdict(now=quiet.started_at + 601).verdict == PROMOTED
    # Short of ratings and leaning worse when time is up: the baseline stays.
    leaning = trial(min_seconds=60, max_seconds=600)
    feed(leaning, "v1", requests=50, ups=1, downs=2)
    feed(leaning, "v0", requests=50, ups=3)
    assert leaning.verdict(now=leaning.started_at + 599) is None
    assert leaning.verdict(now=leaning.started_at + 601).verdict == ROLLED_BACK


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
        for _ in range(80):
            version, completion_id = chat(client)
            served[version] += 1
            thumbs(client, completion_id, "up" if version == "v0" else "down")  # users dislike v1
            if served["v0"] >= 15 and served["v1"] >= 15:  # 0/15 against 15/15: likelihood ratio 2400
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


def test_ab_requests_compare_the_canary_head_to_head(app_client, canary_settings, events, tmp_path):
    publish_fake_adapter(PolicyRegistry(canary_settings.registry_dir), tmp_path)
    with app_client() as client:
        client.portal.call(client.app.state.policies.offer, "v1")
        for _ in range(40):  # users prefer the current version's answer every time
            body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "ab": True}).json()
            versions = [choice["policy_version"] for choice in body["choices"]]
            assert sorted(versions) == ["v0", "v1"]
            response = client.post("/v1/feedback", json={
                "type": "pairwise", "preference": "a" if versions[0] == "v0" else "b",
                "a": {"completion_id": body["id"], "choice_index": 0},
                "b": {"completion_id": body["id"], "choice_index": 1}})
            assert response.status_code == 202, response.text
        figures = client.get("/v1/admin/policy").json()["canary"]["figures"]
        assert (figures["comparisons"], figures["canary_wins"]) == (40, 0)
        assert review(client)["rolled_back"] == ["v1"]
        [event] = events.announced
        assert "preferred in 0 of 40 direct comparisons" in event.reason
        # Without a canary (or a candidate), A/B draws two answers of the current version.
        body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "ab": True}).json()
        assert [choice["policy_version"] for choice in body["choices"]] == ["v0", "v0"]
