"""The chat endpoint's OpenAI semantics, on the fake engine."""

import json

USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_completion_carries_policy_version_and_usage(client, events):
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-policy-version"] == "v0"
    assert body["system_fingerprint"] == "v0"
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "[v0] w1 w2 "}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
    [event] = events.completions
    assert event.completion_id == body["id"]
    assert event.policy_version == "v0"
    assert event.messages[0].content == USER[0]["content"]
    assert event.choices[0].text == "[v0] w1 w2 "
    assert event.sampling.max_tokens == 3


def test_n_choices_and_stop(client):
    body = client.post("/v1/chat/completions",
                       json={"messages": USER, "max_tokens": 8, "n": 3, "stop": ["w2"]}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "[v0] w1 " and c["finish_reason"] == "stop" for c in body["choices"])


def test_default_max_tokens_fills_the_context(client, engine):
    body = client.post("/v1/chat/completions", json={"messages": USER}).json()
    assert body["usage"]["total_tokens"] == engine.max_model_len


def test_stream_sends_role_deltas_finish_and_usage(client, events):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": USER, "max_tokens": 3, "stream": True,
                             "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["x-policy-version"] == "v0"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "[v0] w1 w2 "
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1
    assert events.completions[0].completion_id == chunks[0]["id"]


def test_stream_of_n_choices_sends_one_choice_per_chunk(client):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": USER, "max_tokens": 3, "n": 2, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line and line != "data: [DONE]"]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines]
    assert all(len(c["choices"]) == 1 for c in chunks)  # clients read chunk.choices[0], as OpenAI sends it
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(choice["delta"].get("content") or "" for choice in mine) == "[v0] w1 w2 "
        assert [choice["finish_reason"] for choice in mine if choice["finish_reason"]] == ["length"]


def test_user_id_is_hashed_before_logging(client, events):
    client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "user": "alice@example.com"})
    [event] = events.completions
    assert event.user_hash and "alice" not in event.user_hash and len(event.user_hash) == 32


def test_models_lists_the_served_name_and_versions(client):
    body = client.get("/v1/models").json()
    ids = [m["id"] for m in body["data"]]
    assert ids == ["rlhf-policy", "rlhf-policy@v0"]


def test_pinned_version_is_served(client):
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1,
                                                         "model": "rlhf-policy@v0"})
    assert response.status_code == 200 and response.json()["model"] == "rlhf-policy@v0"


def test_health_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok", "policy_version": "v0"}
    client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    text = client.get("/metrics").text
    assert 'rlhf_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'rlhf_policy_version_info{version="v0"} 1.0' in text


def test_logprobs_in_openai_shape(client):
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "logprobs": True,
                                                     "top_logprobs": 2}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == ["[v0]", "w1"]
    assert content[1] == {"token": "w1", "logprob": -0.5, "bytes": list(b"w1"),
                          "top_logprobs": [{"token": "w1", "logprob": -0.5, "bytes": list(b"w1")},
                                           {"token": "alt0", "logprob": -1.0, "bytes": list(b"alt0")}]}


def test_no_logprobs_unless_asked(client):
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).json()
    assert body["choices"][0]["logprobs"] is None


def test_ab_pairs_current_with_candidate_in_random_order(client, settings, events, tmp_path):
    from common.registry import PolicyRegistry
    from tests.serving.test_policy import publish_fake_adapter

    publish_fake_adapter(PolicyRegistry(settings.registry_dir), tmp_path)
    assert client.post("/v1/admin/candidate", json={"version": "v1"}).json()["candidate"] == "v1"
    orders = set()
    for _ in range(12):
        body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "ab": True}).json()
        versions = [c["policy_version"] for c in body["choices"]]
        assert sorted(versions) == ["v0", "v1"]
        assert [c["message"]["content"].split()[0] for c in body["choices"]] == [f"[{v}]" for v in versions]
        orders.add(tuple(versions))
    assert len(orders) == 2, "A is always the same version: position bias"
    event = events.completions[-1]
    assert [c.policy_version for c in event.choices] == versions
    # a pairwise choice naming both answers of the pair is accepted
    a, b = ({"completion_id": body["id"], "choice_index": i} for i in (0, 1))
    assert client.post("/v1/feedback", json={"type": "pairwise", "a": a, "b": b, "preference": "a"}).status_code == 202


def test_ab_without_candidate_is_two_samples_of_current(client):
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2, "ab": True}).json()
    assert [c["policy_version"] for c in body["choices"]] == ["v0", "v0"]


def test_plain_choices_do_not_name_versions(client):
    body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).json()
    assert "policy_version" not in body["choices"][0]
