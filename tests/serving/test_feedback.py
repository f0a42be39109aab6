"""/v1/feedback: every kind is accepted for answers this server gave; anything else is a clear 4xx."""

import pytest
from fastapi.testclient import TestClient

from common.registry import PolicyVersion
from feedback import idempotent_event_id
from serving.app import build_app
from serving.canary import CanaryConfig, CanaryTrial
from serving.chat import hash_user
from serving.settings import ServingSettings
from tests.serving.test_auth import keyed
from trainer.data.store import likert_target, to_training_data

USER = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def completion_id(client) -> str:
    return client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "n": 2}).json()["id"]


def test_thumbs_up_is_recorded(client, events, completion_id):
    response = client.post("/v1/feedback", json={"type": "thumbs", "completion_id": completion_id,
                                                 "choice_index": 1, "rating": "up"})
    assert response.status_code == 202, response.text
    [event] = events.feedback
    assert response.json()["id"] == event.event_id
    assert (event.feedback.completion_id, event.feedback.choice_index, event.feedback.rating) == (
        completion_id, 1, "up")


@pytest.mark.parametrize("body", [
    {"type": "rating", "choice_index": 0, "score": 7},
    {"type": "correction", "choice_index": 1, "text": "Hello there!"},
])
def test_other_single_answer_kinds(client, events, completion_id, body):
    assert client.post("/v1/feedback", json={**body, "completion_id": completion_id}).status_code == 202
    assert events.feedback[0].feedback.type == body["type"]


def test_pairwise_and_ranking_across_choices(client, events, completion_id):
    a, b = {"completion_id": completion_id, "choice_index": 0}, {"completion_id": completion_id, "choice_index": 1}
    assert client.post("/v1/feedback", json={"type": "pairwise", "a": a, "b": b,
                                             "preference": "b"}).status_code == 202
    assert client.post("/v1/feedback", json={"type": "ranking", "ranked": [b, a]}).status_code == 202
    assert [e.feedback.type for e in events.feedback] == ["pairwise", "ranking"]


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


def test_unknown_completion_is_404(client, events):
    error = _error(client.post("/v1/feedback", json={"type": "thumbs", "completion_id": "chatcmpl-nope",
                                                      "rating": "up"}), 404)
    assert "chatcmpl-nope" in error["message"]
    assert events.feedback == []


def test_choice_out_of_range_is_400(client, events, completion_id):
    error = _error(client.post("/v1/feedback", json={"type": "thumbs", "completion_id": completion_id,
                                                      "choice_index": 2, "rating": "up"}), 400)
    assert error["param"] == "choice_index" and "2 choice" in error["message"]
    assert events.feedback == []


@pytest.mark.parametrize("body, fragment", [
    ({"type": "thumbs", "completion_id": "x", "rating": "sideways"}, "rating"),
    ({"type": "thumbs", "rating": "up"}, "completion_id"),
    ({"type": "stars", "completion_id": "x"}, "type"),
    ({"type": "thumbs", "completion_id": "x", "choice_index": -1, "rating": "up"}, "choice_index"),
    ({"type": "rating", "completion_id": "x", "score": 9}, "score"),
    ({"type": "ranking", "ranked": [{"completion_id": "x"}]}, "ranked"),
    ({"type": "pairwise", "a": {"completion_id": "x"}, "b": {"completion_id": "x"}, "preference": "a"},
     "different"),
    ([1, 2, 3], "dict"),
])
def test_malformed_feedback_is_400(client, events, body, fragment):
    error = _error(client.post("/v1/feedback", json=body), 400)
    assert fragment in error["message"] or fragment == error["param"], error
    assert events.feedback == []


def test_broken_json_is_400(client):
    error = _error(client.post("/v1/feedback", content=b'{"type": "thumbs",',
                               headers={"content-type": "application/json"}), 400)
    assert "JSON" in error["message"]


def test_broker_unavailable_is_503_and_nothing_claimed(client, events, completion_id):
    events.available = False
    _error(client.post("/v1/feedback", json={"type": "thumbs", "completion_id": completion_id,
                                             "rating": "down"}), 503)


# --- Richer records, attribution ------------------------------------------------------------------


def test_comment_source_metadata_and_arena_fields_are_recorded(client, events, completion_id):
    a, b = {"completion_id": completion_id, "choice_index": 0}, {"completion_id": completion_id, "choice_index": 1}
    response = client.post("/v1/feedback", json={
        "type": "pairwise", "a": a, "b": b, "preference": "tie", "both_bad": True, "shown_first": "b",
        "comment": "Neither answers the question.", "source": "operator", "metadata": {"screen": "ab", "n": 2}})
    assert response.status_code == 202, response.text
    [event] = events.feedback
    assert (event.feedback.both_bad, event.feedback.shown_first, event.feedback.comment, event.feedback.source,
            event.feedback.metadata) == (True, "b", "Neither answers the question.", "operator", {"screen": "ab", "n": 2})
    assert event.schema_version == 2


@pytest.mark.parametrize("extra, fragment", [
    ({"metadata": {"blob": "x" * 3000}}, "metadata"),
    ({"metadata": {"nested": {"a": 1}}}, "metadata"),
    ({"comment": None, "user": "u" * 257}, "user"),
    ({"source": "robot"}, "source"),
])
def test_out_of_bounds_annotations_are_400(client, events, completion_id, extra, fragment):
    body = {"type": "thumbs", "completion_id": completion_id, "rating": "up", **extra}
    error = _error(client.post("/v1/feedback", json=body), 400)
    assert fragment in (error["param"] or "") + error["message"], error
    assert events.feedback == []


def test_both_bad_needs_a_tie(client, completion_id):
    a, b = {"completion_id": completion_id, "choice_index": 0}, {"completion_id": completion_id, "choice_index": 1}
    error = _error(client.post("/v1/feedback", json={"type": "pairwise", "a": a, "b": b, "preference": "a",
                                                     "both_bad": True}), 400)
    assert "both_bad" in error["message"]


def test_feedback_names_its_user_hashed_and_its_app_key(settings, engine, events):
    settings = keyed(settings, api_keys=["key-one", "key-two"])
    with TestClient(build_app(settings, lambda: engine, lambda: events), raise_server_exceptions=False) as client:
        for key in ("key-one", "key-two"):
            headers = {"authorization": f"Bearer {key}"}
            completion = client.post("/v1/chat/completions", headers=headers,
                                     json={"messages": USER, "max_tokens": 2}).json()["id"]
            assert client.post("/v1/feedback", headers=headers, json={
                "type": "thumbs", "completion_id": completion, "rating": "up", "user": "alice"}).status_code == 202
    one, two = events.feedback
    assert one.user_hash == two.user_hash == hash_user("alice") != "alice"
    assert None not in (one.app_key_id, two.app_key_id) and one.app_key_id != two.app_key_id
    assert "key-one" not in one.model_dump_json()


def test_one_user_rating_one_answer_fifty_times_weighs_once_in_trainer_and_canary(client, events):
    policies = client.app.state.policies
    # A canary trial that never decides (it would need a million requests): all traffic on the baseline.
    policies.trial = CanaryTrial(baseline=policies.current, canary=PolicyVersion(1, None, {"version": "v1"}),
                                 config=CanaryConfig(fraction=0.0, min_requests=10**6))
    completion = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "user": "alice"})
    completion_id = completion.json()["id"]
    scores = [1, 7, 2, 6, 3, 5] * 8 + [2, 6]  # 50 ratings, changing their mind; the last approves
    for score in scores:
        assert client.post("/v1/feedback", json={"type": "rating", "completion_id": completion_id, "score": score,
                                                 "user": "alice"}).status_code == 202
    assert len(events.feedback) == 50 and {e.user_hash for e in events.feedback} == {hash_user("alice")}
    data = to_training_data(events.feedback, {c.completion_id: c for c in events.completions})
    assert [label.target for label in data.reward.pointwise] == [likert_target(6)]
    baseline = policies.trial.evidence.arms["baseline"]
    assert (baseline.ratings, baseline.approvals) == (1, 1)


# --- Idempotency ----------------------------------------------------------------------------------


def thumbs(completion_id: str, **fields) -> dict:
    return {"type": "thumbs", "completion_id": completion_id, "rating": "up", **fields}


def test_a_retry_with_the_same_idempotency_key_yields_one_event(client, events, completion_id):
    answers = [client.post("/v1/feedback", json=thumbs(completion_id), headers={"Idempotency-Key": "retry-1"})
               for _ in range(5)]
    assert [a.status_code for a in answers] == [202] * 5
    assert len({a.json()["id"] for a in answers}) == 1
    [event] = events.feedback
    assert event.event_id == answers[0].json()["id"] == idempotent_event_id(None, "retry-1")
    # The same key in the body is the same key.
    again = client.post("/v1/feedback", json=thumbs(completion_id, event_id="retry-1"))
    assert (again.status_code, again.json()["id"], len(events.feedback)) == (202, event.event_id, 1)


def test_a_key_reused_with_another_body_is_409(client, events, completion_id):
    assert client.post("/v1/feedback", json=thumbs(completion_id, event_id="k")).status_code == 202
    error = _error(client.post("/v1/feedback", json=thumbs(completion_id, event_id="k", rating="down")), 409)
    assert error["code"] == "idempotency_conflict"
    _error(client.post("/v1/feedback", json=thumbs(completion_id, event_id="k", user="bob")), 409)
    assert len(events.feedback) == 1


def test_header_and_body_keys_must_agree(client, events, completion_id):
    error = _error(client.post("/v1/feedback", json=thumbs(completion_id, event_id="a"),
                               headers={"Idempotency-Key": "b"}), 400)
    assert error["param"] == "event_id"
    assert events.feedback == []


def test_a_failed_attempt_is_not_remembered(client, events, completion_id):
    events.available = False
    _error(client.post("/v1/feedback", json=thumbs(completion_id, event_id="k")), 503)
    events.available = True
    assert client.post("/v1/feedback", json=thumbs(completion_id, event_id="k")).json()["id"] == \
        idempotent_event_id(None, "k")
    assert len(events.feedback) == 1


def test_idempotent_ids_are_scoped_to_the_app_key():
    assert idempotent_event_id("key-a", "k") != idempotent_event_id("key-b", "k")
    assert idempotent_event_id("key-a", "k") == idempotent_event_id("key-a", "k")


# --- Batch ----------------------------------------------------------------------------------------


def test_a_batch_answers_each_item_and_one_bad_item_sinks_nothing(client, events, completion_id):
    items = [thumbs(completion_id), {"type": "thumbs", "rating": "up"}, thumbs("chatcmpl-forged"),
             thumbs(completion_id, choice_index=7), thumbs(completion_id, rating="down"), "not an object"]
    response = client.post("/v1/feedback/batch", json={"feedback": items})
    assert response.status_code == 207, response.text
    body = response.json()
    assert [item["status"] for item in body["data"]] == [202, 400, 404, 400, 202, 400]
    assert body["accepted"] == 2 and [item["index"] for item in body["data"]] == list(range(6))
    assert body["data"][1]["error"]["param"] == "thumbs.completion_id"
    assert [e.event_id for e in events.feedback] == [body["data"][0]["id"], body["data"][4]["id"]]


def test_a_batch_retried_under_one_idempotency_key_adds_nothing(client, events, completion_id):
    items = [thumbs(completion_id), thumbs(completion_id, choice_index=1, rating="down")]
    first = client.post("/v1/feedback/batch", json={"feedback": items}, headers={"Idempotency-Key": "batch-1"})
    retry = client.post("/v1/feedback/batch", json={"feedback": items}, headers={"Idempotency-Key": "batch-1"})
    assert first.json() == retry.json() and first.json()["accepted"] == 2
    assert len(events.feedback) == 2


@pytest.mark.parametrize("body", [{"feedback": []}, {"feedback": [{}] * 101}, {"items": []}])
def test_an_empty_or_oversized_batch_is_400(client, events, body):
    _error(client.post("/v1/feedback/batch", json=body), 400)
    assert events.feedback == []


# --- Abuse limits ---------------------------------------------------------------------------------


@pytest.fixture
def limited_client(tmp_path, engine, events):
    settings = ServingSettings(registry_dir=tmp_path / "registry", follow_policy_topic=False,
                               feedback_rate_per_user=0.001, feedback_burst_per_user=3,
                               feedback_rate_per_key=0.001, feedback_burst_per_key=5)
    with TestClient(build_app(settings, lambda: engine, lambda: events), raise_server_exceptions=False) as client:
        yield client


def test_one_user_beyond_their_rate_gets_429_with_retry_after(limited_client, events):
    completion_id = limited_client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).json()["id"]
    statuses = [limited_client.post("/v1/feedback", json=thumbs(completion_id, user="alice")).status_code
                for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
    refused = limited_client.post("/v1/feedback", json=thumbs(completion_id, user="alice"))
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert int(refused.headers["retry-after"]) >= 1
    # Another user still gets through, until the app key's own bucket (5) is empty.
    statuses = [limited_client.post("/v1/feedback", json=thumbs(completion_id, user=user)).status_code
                for user in ("bob", "carol", "dave")]
    assert statuses == [202, 202, 429]
    assert len(events.feedback) == 5


def test_rate_limited_batch_items_say_when_to_retry(limited_client, events):
    completion_id = limited_client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).json()["id"]
    response = limited_client.post("/v1/feedback/batch", json={"feedback": [thumbs(completion_id, user="eve")] * 4})
    assert [item["status"] for item in response.json()["data"]] == [202, 202, 202, 429]
    assert response.json()["data"][3]["retry_after"] >= 1 and int(response.headers["retry-after"]) >= 1
