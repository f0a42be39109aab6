"""Bad chat requests get a 4xx with an OpenAI-style error body; none reaches the engine."""

import pytest

USER = [{"role": "user", "content": "Hi"}]


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "   "}]}, None),
    ({"messages": USER, "temperature": 5}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "n": "many"}, "n"),
    ({"messages": USER, "top_logprobs": 2}, None),
    ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": USER, "ab": True, "n": 2}, None),
    ({"messages": USER, "ab": True, "stream": True}, None),
    ("not an object", None),
])
def test_invalid_chat_request_is_400(client, events, body, param):
    error = _error(client.post("/v1/chat/completions", json=body), 400)
    if param:
        assert error["param"] == param, error
    assert events.completions == []


def test_n_over_the_maximum_is_400(client):
    assert _error(client.post("/v1/chat/completions", json={"messages": USER, "n": 5}), 400)["param"] == "n"


def test_prompt_plus_max_tokens_over_context_is_400(client, engine):
    error = _error(client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": engine.max_model_len}),
                   400)
    assert error["param"] == "max_tokens" and str(engine.max_model_len) in error["message"]


def test_prompt_alone_over_context_is_400(client):
    long = [{"role": "user", "content": "word " * 200}]
    assert _error(client.post("/v1/chat/completions", json={"messages": long}), 400)["param"] == "messages"


def test_unknown_model_and_version_are_404(client):
    assert _error(client.post("/v1/chat/completions", json={"messages": USER, "model": "gpt-9"}), 404)
    assert _error(client.post("/v1/chat/completions", json={"messages": USER, "model": "rlhf-policy@v7"}), 404)
    assert _error(client.post("/v1/chat/completions", json={"messages": USER, "model": "rlhf-policy@latest"}), 404)


def test_oversized_body_is_413(client):
    huge = [{"role": "user", "content": "x" * 10_000}]
    assert _error(client.post("/v1/chat/completions", json={"messages": huge}), 413)["code"] == "request_too_large"


def test_non_utf8_body_is_400(client):
    _error(client.post("/v1/chat/completions", content=b'{"messages": "\xff\xfe"}',
                       headers={"content-type": "application/json"}), 400)


def test_unknown_path_is_404_json(client):
    assert _error(client.get("/v1/nothing"), 404)["type"] == "not_found_error"


def test_wrong_method_is_405_json(client):
    _error(client.get("/v1/chat/completions"), 405)
