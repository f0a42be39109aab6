"""Simulated users against a fake API: every request and feedback body they send is valid for the real
one, they send every kind of feedback, and each judgment follows their hidden preference."""

import asyncio
import itertools
import json
import random
from collections import Counter

import httpx

from bench.hidden_preferences import PREFERENCES
from bench.simulated_users import SimulatedUsers, UserConfig
from serving.protocol import ChatCompletionRequest, FeedbackRequest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LIKED, DISLIKED = "The capital of France is Paris.", "Paris."  # for a user who wants the subject restated


class FakeAPI:
    """Answers alternate liked and disliked texts; versions alternate v0 and v1; every 7th answer is cut."""

    def __init__(self):
        self.texts = itertools.cycle([LIKED, DISLIKED, DISLIKED])
        self.counter = itertools.count()
        self.feedback: list[dict] = []
        self.answers: dict[tuple[str, int], tuple[str, bool]] = {}  # (completion id, index) -> (text, cut)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/feedback":
            FeedbackRequest.model_validate(body)  # raises on a body the real API would refuse
            assert body["user"].startswith("demo-user-")  # so the trainer and the canary count it once per user
            self.feedback.append(body)
            return httpx.Response(202, json={"id": "f", "object": "feedback", "status": "accepted"})
        ChatCompletionRequest.model_validate(body)
        assert body["user"].startswith("demo-user-")
        number = next(self.counter)
        n = 2 if body.get("ab") else body.get("n", 1)
        choices = [{"index": i, "message": {"role": "assistant", "content": next(self.texts)},
                    "finish_reason": "length" if (number + i) % 7 == 6 else "stop",
                    **({"policy_version": f"v{i}"} if body.get("ab") else {})} for i in range(n)]  # fmt: skip
        for choice in choices:
            self.answers[f"chatcmpl-{number}", choice["index"]] = (choice["message"]["content"],
                                                                   choice["finish_reason"] == "length")
        return httpx.Response(200, json={"id": f"chatcmpl-{number}", "system_fingerprint": f"v{number % 2}",
                                         "choices": choices})


def run_exchanges(config: UserConfig, exchanges: int = 300) -> tuple[SimulatedUsers, FakeAPI]:
    api = FakeAPI()

    async def drive() -> SimulatedUsers:
        async with httpx.AsyncClient(transport=httpx.MockTransport(api), base_url="http://test") as http:
            users = SimulatedUsers(http, PREFERENCES["subject"], config)
            rng = random.Random(0)
            for _ in range(exchanges):
                await users.exchange("demo-user-0", QUESTION, rng)
            return users

    return asyncio.run(drive()), api


def test_users_send_every_kind_of_feedback_each_following_the_preference():
    users, api = run_exchanges(UserConfig(label_noise=0.0))
    kinds = Counter(f["type"] for f in api.feedback)
    assert set(kinds) == {"thumbs", "rating", "pairwise", "ranking", "correction"}
    assert users.log.feedback_counts() == kinds and not users.log.errors
    served = {s["version"] for s in users.log.served}
    assert served == {"v0", "v1"}
    # Every thumbs up, and only those, is on an answer the user liked (restated, not cut).
    liked = [s["satisfied"] for s in users.log.served if s["mode"] == "plain"]
    assert any(liked) and not all(liked)
    for event, record in zip((f for f in api.feedback if f["type"] == "thumbs"),
                             (r for r in users.log.feedback if r["type"] == "thumbs"), strict=True):  # fmt: skip
        assert record["up"] == (event["rating"] == "up")
    assert sum(len(v) for v in users.log.thumbs_by_version().values()) == kinds["thumbs"]
    for event in api.feedback:
        if event["type"] == "correction":
            assert event["text"] == LIKED  # the shortest corpus phrasing that restates the subject
        if event["type"] == "rating":
            assert event["score"] in (1, 2, 3, 5, 6, 7)


def test_pairwise_and_rankings_put_the_liked_answer_first():
    users, api = run_exchanges(UserConfig(label_noise=0.0, ab_share=0.5, ranking_share=0.5))

    def degree(ref: dict) -> float:
        text, cut = api.answers[ref["completion_id"], ref["choice_index"]]
        return float("-inf") if cut else PREFERENCES["subject"].degree(QUESTION[0]["content"], text)

    pairwise = [e for e in api.feedback if e["type"] == "pairwise"]
    rankings = [e for e in api.feedback if e["type"] == "ranking"]
    assert len(pairwise) > 100 and len(rankings) > 100
    for event in pairwise:
        a, b = degree(event["a"]), degree(event["b"])
        assert event["preference"] == ("tie" if a == b else "a" if a > b else "b")
    for event in rankings:
        degrees = [degree(ref) for ref in event["ranked"]]
        assert len(degrees) in (3, 4) and degrees == sorted(degrees, reverse=True)


def test_a_slip_reverses_the_judgment():
    honest, _ = run_exchanges(UserConfig(label_noise=0.0), exchanges=200)
    careless, _ = run_exchanges(UserConfig(label_noise=1.0), exchanges=200)
    untimed = [[{k: v for k, v in s.items() if k != "t"} for s in u.log.served] for u in (honest, careless)]
    assert untimed[0] == untimed[1]  # same answers, same rng draws
    agree = [h["up"] != c["up"] for h, c in zip(
        (r for r in honest.log.feedback if r["type"] == "thumbs"),
        (r for r in careless.log.feedback if r["type"] == "thumbs"), strict=True)]  # fmt: skip
    assert agree and all(agree)
