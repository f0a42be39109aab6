"""The official openai client against the real server (vLLM engine), every supported parameter,
streaming and not."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

MODEL = "rlhf-policy"
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "What is 3 plus 4?"},
]


@pytest.fixture(scope="module")
def client(serving) -> OpenAI:
    return OpenAI(base_url=f"{serving.url}/v1", api_key="not-needed", max_retries=0)


def test_multi_turn_with_all_sampling_parameters(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=CHAT, n=3, temperature=0.8, top_p=0.9, max_completion_tokens=12, seed=11,
        presence_penalty=0.5, frequency_penalty=0.5, user="end-user-42")
    assert len(completion.choices) == 3 and [c.index for c in completion.choices] == [0, 1, 2]
    for choice in completion.choices:
        assert choice.message.role == "assistant" and choice.message.content
        assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 3 * 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.model.startswith(MODEL + "@") and completion.system_fingerprint.startswith("v")


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=CHAT, temperature=1.0, max_tokens=16,
                                              seed=seed).choices[0].message.content

    assert sample(5) == sample(5)
    assert len({sample(s) for s in range(6)}) > 1, "different seeds never changed the answer"


def test_max_tokens_and_stop(client):
    short = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0)
    answer = full.choices[0].message.content
    assert len(answer) >= 2, answer
    # Stopping at the answer's last character cuts at least that character off (earlier if it repeats).
    stop = answer[-1]
    stopped = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0,
                                             stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].message.content
    assert answer.startswith(stopped.choices[0].message.content)
    assert len(stopped.choices[0].message.content) < len(answer)


def test_logprobs(client, base_model_dir):
    completion = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert token.logprob == pytest.approx(max(t.logprob for t in token.top_logprobs), abs=1e-4)
    text = "".join(t.token for t in content)
    if completion.choices[0].finish_reason == "stop":  # the end-of-sequence token is scored, not shown
        eos = AutoTokenizer.from_pretrained(base_model_dir).eos_token
        assert text.endswith(eos)
        text = text.removesuffix(eos)
    assert text == completion.choices[0].message.content


def test_streaming_matches_non_streaming_and_reports_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_streaming_n_choices(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, stream=True))
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_models_and_pinning(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == MODEL and f"{MODEL}@v0" in ids
    pinned = client.chat.completions.create(model=f"{MODEL}@v0", messages=CHAT, max_tokens=2)
    assert pinned.system_fingerprint == "v0"


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, n=99)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_ab_through_extra_body(client):
    completion = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, extra_body={"ab": True})
    assert len(completion.choices) == 2
    assert all(c.model_extra.get("policy_version", "").startswith("v") for c in completion.choices)
