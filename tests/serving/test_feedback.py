"""/v1/feedback: every kind is accepted for answers this server gave; anything else is a clear 4xx."""

import pytest

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
