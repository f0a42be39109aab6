"""The whole loop through public interfaces only, on the real broker and the real vLLM engine:

chat (official openai client) -> thumbs (/v1/feedback) -> Kafka -> trainer (reward model, PPO) ->
registry + policy topic -> serving puts the new version into canary, then promotes it -> responses report
the new version, and no request fails while it switches.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest
from openai import OpenAI

from deploy.local import stop_service
from tests.conftest import start_logged_service
from trainer.data.corpus import sample_prompts

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

MODEL = "rlhf-policy"


class Traffic(threading.Thread):
    """Keeps requests going (streaming and not) and records each one's policy version or failure."""

    def __init__(self, client: OpenAI, prompts: list[list[dict]]):
        super().__init__(daemon=True)
        self.client, self.prompts = client, prompts
        self.versions: list[str] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            messages = self.prompts[i % len(self.prompts)]
            try:
                if i % 2:
                    chunks = list(self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                                                      stream=True))
                    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
                    self.versions.append(chunks[0].system_fingerprint)
                else:
                    completion = self.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
                    assert completion.choices[0].finish_reason in ("stop", "length")
                    self.versions.append(completion.system_fingerprint)
            except Exception as exc:  # any failure at all counts
                self.failures.append(repr(exc))
            i += 1
            time.sleep(0.05)  # steady traffic, not a flood: the trainer shares these 2 cores


def test_feedback_trains_a_new_policy_that_serving_switches_to(serving, tmp_path):
    client = OpenAI(base_url=f"{serving.url}/v1", api_key="not-needed", max_retries=0, timeout=60)
    prompts = sample_prompts(16, seed=7)

    # 1. Users chat and give thumbs: up for the longer of two answers, down for the other.
    feedback_sent = 0
    for messages in prompts:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=24, n=2,
                                                               temperature=1.0)
        completion = raw.parse()
        assert raw.headers["x-policy-version"] == completion.system_fingerprint
        start_version = completion.system_fingerprint
        lengths = [len(c.message.content) for c in completion.choices]
        for choice in completion.choices:
            rating = "up" if lengths[choice.index] == max(lengths) else "down"
            response = httpx.post(f"{serving.url}/v1/feedback", json={
                "type": "thumbs", "completion_id": completion.id, "choice_index": choice.index, "rating": rating})
            assert response.status_code == 202, response.text
            feedback_sent += 1
    assert start_version == "v0"

    # 2. Traffic keeps flowing while the trainer works and serving switches.
    traffic = Traffic(client, prompts)
    traffic.start()

    # 3. The trainer consumes the stream and publishes a version once it has enough feedback.
    env = {**serving.env, "TRAINER_WORK_DIR": str(tmp_path / "trainer"), "TRAINER_MIN_NEW_FEEDBACK": "16",
           "TRAINER_CHECK_INTERVAL_S": "0.2", "TRAINER_TORCH_THREADS": "1", "TRAINER_METRICS_PORT": "0", "TRAINER_RM_EPOCHS": "2",
           "TRAINER_PPO_STEPS": "2", "TRAINER_PPO_ROLLOUT_BATCH_SIZE": "8", "TRAINER_PPO_MAX_NEW_TOKENS": "16",
           "TRAINER_CORPUS_PROMPTS": "8", "TRAINER_PTX_DIALOGUES": "8",
           # The wiring is under test here, not the judge: 40 thumbs leave too few held-out comparisons
           # to validate one (tests/trainer/evaluation/test_gate.py tests that rule).
           "TRAINER_EVAL_REQUIRE_VALIDATED_JUDGE": "false"}
    trainer, trainer_log = start_logged_service("trainer", ["trainer", "run"], env)
    try:
        deadline = time.monotonic() + 900  # a hang guard: its vLLM engine once took 164 s to start
        while "v1" not in traffic.versions:
            assert trainer.poll() is None, f"trainer exited:\n{trainer_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no new version in time:\n{trainer_log.read_text()[-3000:]}"
            time.sleep(1)
        # 4. v1 serves half the traffic as a canary until serving promotes it (10 requests, see conftest).
        while (policy := httpx.get(f"{serving.url}/v1/admin/policy").json())["current"] != "v1":
            assert policy["canary"] and policy["canary"]["version"] == "v1", policy
            assert time.monotonic() < deadline, f"canary not promoted in time: {policy}"
            time.sleep(0.2)
        promoted_at = len(traffic.versions)
        while len(traffic.versions) < promoted_at + 11:  # keep going a little past the promotion
            time.sleep(0.2)
    finally:
        traffic.stop.set()
        traffic.join(timeout=60)
        stop_service(trainer)

    # 5. The version changed, only forward, and nothing failed on the way.
    seen = traffic.versions
    first_new = seen.index("v1")
    in_canary = Counter(seen[first_new:promoted_at])
    # The one request in flight when the promotion was seen may have started on v0; all later ones are v1.
    assert set(seen[:first_new]) == {"v0"} and set(seen[promoted_at + 1:]) == {"v1"}, Counter(seen)
    assert in_canary["v1"] >= 5 and policy["rolled_back"] == [], (in_canary, policy)
    assert traffic.failures == [], traffic.failures[:5]
    models = {m.id for m in client.models.list().data}
    assert f"{MODEL}@v1" in models
    print(f"feedback sent: {feedback_sent}; requests: {len(seen)} ({first_new} on v0 before v1 came, "
          f"{dict(in_canary)} during its canary, {len(seen) - promoted_at} after its promotion), "
          f"failures: {len(traffic.failures)}")
