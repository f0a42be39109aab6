"""Simulated users of the public HTTP API: they chat and give every kind of feedback from a hidden preference.

Each user has an id of its own (`user` on every request and every piece of feedback) and its own stream of questions
(trainer.data.corpus.sample_prompts: system messages and earlier turns included). After each answer it thinks
for an exponential time, so all users together send up to `requests_per_s` requests (fewer when answers are
slow: a user waits for its answer). A request is one of:

- plain (one answer): thumbs up/down or a 1-7 rating (5-7 when the answer satisfies, 1-3 when not), and
  for some disliked answers a correction written to satisfy (HiddenPreference.correction);
- A/B (`"ab": true`, two answers, possibly of two versions): a pairwise choice, the answer of higher degree
  preferred, a tie when equal;
- several answers (`n` 3 or 4): a ranking by degree, ties broken at random as a person would, sent only
  when the answers differ at all.

An answer cut at `max_tokens` satisfies nobody and ranks last. With probability `label_noise` a user slips
and its whole judgment of a request is reversed. Everything a user sees and sends is kept in `UserLog`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx

from bench.hidden_preferences import HiddenPreference, Messages, last_question
from trainer.data.corpus import sample_prompts

USER_SEEDS = 10**5  # users' question streams: sample_prompts seeds from here on


@dataclass(frozen=True)
class UserConfig:
    users: int = 8  # simulated users, each with its own `user` id and stream of questions
    requests_per_s: float = 2.0  # all users together, at most (a user waits for its answer, then thinks)
    ab_share: float = 0.2  # requests with "ab": true, answered by a pairwise choice
    ranking_share: float = 0.1  # requests for 3 or 4 answers, answered by a ranking
    feedback_share: float = 0.8  # plain answers the user reacts to at all
    rating_share: float = 0.3  # of those reactions, a 1-7 rating instead of thumbs
    correction_share: float = 0.25  # disliked plain answers the user also writes a correction for
    label_noise: float = 0.05  # requests whose judgment the user reverses by mistake
    max_tokens: int = 64  # the users' app caps answers here; an answer cut at the cap satisfies nobody
    questions_per_user: int = 5000  # length of each user's question stream (it cycles)
    seed: int = 0  # users' question streams and choices; the evaluation questions use seeds of their own


@dataclass(frozen=True)
class Answer:
    completion_id: str
    choice_index: int
    text: str
    version: str
    truncated: bool


@dataclass
class UserLog:
    """What the users saw and said. Versions are those that answered (non-pinned traffic only)."""

    served: list[dict] = field(default_factory=list)  # one per answer: version, satisfied, mode, t
    feedback: list[dict] = field(default_factory=list)  # one per feedback event sent, with the versions it rates
    requests: int = 0
    errors: Counter = field(default_factory=Counter)  # failed requests by kind

    def records(self) -> list[dict]:
        """The log as JSON lines: every answer served and every feedback event sent."""
        return [{"kind": "served", **a} for a in self.served] + [{"kind": "feedback", **f} for f in self.feedback]

    def feedback_counts(self) -> Counter:
        return Counter(event["type"] for event in self.feedback)

    def thumbs_by_version(self) -> dict[str, list[bool]]:
        """Thumbs up (True) or down on each version's answers."""
        thumbs: dict[str, list[bool]] = defaultdict(list)
        for event in self.feedback:
            if event["type"] == "thumbs":
                thumbs[event["versions"][0]].append(event["up"])
        return dict(thumbs)

    def satisfied_by_version(self) -> dict[str, list[bool]]:
        """Whether each answer the users got satisfied the hidden preference, by version."""
        served: dict[str, list[bool]] = defaultdict(list)
        for answer in self.served:
            served[answer["version"]].append(answer["satisfied"])
        return dict(served)


class SimulatedUsers:
    def __init__(self, http: httpx.AsyncClient, preference: HiddenPreference, config: UserConfig,
                 served_model: str = "rlhf-policy"):
        self.http = http
        self.preference = preference
        self.config = config
        self.served_model = served_model
        self.log = UserLog()
        self.started = time.monotonic()

    async def run(self, stop: asyncio.Event) -> None:
        """Every user chats until `stop` is set; a request in flight then finishes."""
        await asyncio.gather(*(self._user(index, stop) for index in range(self.config.users)))

    async def _user(self, index: int, stop: asyncio.Event) -> None:
        config = self.config
        rng = random.Random(f"user-{config.seed}-{index}")
        # Corpus seeds of their own: the trainer draws its corpus prompts from seeds 0, 1, 2, ...
        questions = sample_prompts(config.questions_per_user, seed=USER_SEEDS + config.seed * 1000 + index)
        think_rate = config.requests_per_s / config.users
        for turn in itertools.count():
            try:
                await asyncio.wait_for(stop.wait(), timeout=rng.expovariate(think_rate))
                return
            except TimeoutError:
                pass
            try:
                await self.exchange(f"demo-user-{index}", questions[turn % len(questions)], rng)
            except httpx.HTTPError as exc:  # the stack is busy or restarting a part: the user tries again later
                self.log.errors[type(exc).__name__] += 1

    async def exchange(self, user: str, messages: Messages, rng: random.Random) -> None:
        """One request and the user's feedback on it."""
        config = self.config
        body: dict = {"model": self.served_model, "messages": messages, "user": user, "max_tokens": config.max_tokens}
        roll = rng.random()
        if roll < config.ab_share:
            mode, body["ab"] = "ab", True
        elif roll < config.ab_share + config.ranking_share:
            mode, body["n"] = "ranking", rng.choice((3, 4))
        else:
            mode = "plain"
        response = await self.http.post("/v1/chat/completions", json=body)
        self.log.requests += 1
        if response.status_code != 200:
            self.log.errors[f"chat {response.status_code}"] += 1
            return
        completion = response.json()
        answers = [
            Answer(completion["id"], choice["index"], choice["message"]["content"],
                   choice.get("policy_version") or completion["system_fingerprint"],
                   choice["finish_reason"] == "length")
            for choice in completion["choices"]
        ]  # fmt: skip
        question = last_question(messages)
        now = time.monotonic() - self.started
        for answer in answers:
            self.log.served.append({"t": now, "user": user, "mode": mode, "version": answer.version,
                                    "satisfied": self.likes(question, answer)})
        slip = rng.random() < config.label_noise
        for feedback in self.react(mode, question, answers, slip, rng):
            await self._send({**feedback, "user": user}, answers, now)

    def likes(self, question: str, answer: Answer) -> bool:
        return not answer.truncated and self.preference.satisfied(question, answer.text)

    def degree(self, question: str, answer: Answer) -> float:
        return float("-inf") if answer.truncated else self.preference.degree(question, answer.text)

    def react(self, mode: str, question: str, answers: list[Answer], slip: bool, rng: random.Random) -> list[dict]:
        """The feedback bodies the user sends about one response (`slip`: its judgment reversed)."""
        if mode == "ab":
            first, second = (self.degree(question, a) for a in answers)
            preference = "tie" if first == second else "a" if (first > second) != slip else "b"
            return [{"type": "pairwise", "a": _ref(answers[0]), "b": _ref(answers[1]), "preference": preference}]
        if mode == "ranking":
            keyed = [(self.degree(question, a), rng.random(), a) for a in answers]
            if len({degree for degree, _, _ in keyed}) == 1:
                return []  # the user sees no difference to rank
            ranked = [a for _, _, a in sorted(keyed, key=lambda k: k[:2], reverse=not slip)]
            return [{"type": "ranking", "ranked": [_ref(a) for a in ranked]}]
        answer = answers[0]
        liked = self.likes(question, answer)
        feedback = []
        if rng.random() < self.config.feedback_share:
            if rng.random() < self.config.rating_share:
                score = rng.choice((5, 6, 7)) if liked != slip else rng.choice((1, 2, 3))
                feedback.append({"type": "rating", **_ref(answer), "score": score})
            else:
                feedback.append({"type": "thumbs", **_ref(answer), "rating": "up" if liked != slip else "down"})
        if not liked and rng.random() < self.config.correction_share:
            if (text := self.preference.correction(question, rng)) is not None:
                feedback.append({"type": "correction", **_ref(answer), "text": text})
        return feedback

    async def _send(self, feedback: dict, answers: list[Answer], t: float) -> None:
        for attempt in range(3):  # 503: Kafka did not take the event; the API asks clients to retry
            response = await self.http.post("/v1/feedback", json=feedback)
            if response.status_code != 503:
                break
            await asyncio.sleep(1 + attempt)
        if response.status_code != 202:
            self.log.errors[f"feedback {response.status_code}"] += 1
            return
        versions = {(a.completion_id, a.choice_index): a.version for a in answers}
        rated = [versions[r["completion_id"], r["choice_index"]] for r in _refs(feedback)]
        record = {"t": t, "type": feedback["type"], "versions": rated}
        if feedback["type"] == "thumbs":
            record["up"] = feedback["rating"] == "up"
        self.log.feedback.append(record)


def _ref(answer: Answer) -> dict:
    return {"completion_id": answer.completion_id, "choice_index": answer.choice_index}


def _refs(feedback: dict) -> list[dict]:
    if feedback["type"] == "pairwise":
        return [feedback["a"], feedback["b"]]
    if feedback["type"] == "ranking":
        return feedback["ranked"]
    return [feedback]

