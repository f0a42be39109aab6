"""A version's preference rate, measured on pinned requests (`model: "rlhf-policy@vN"`).

The same questions, with the same request seeds, for every version: `questions` held-out questions
(trainer.data.split puts them on the side no reward model or PPO round trains on) on which the preference is
at stake (the corpus has answers to them that satisfy it and answers that do not; HiddenPreference.at_stake),
`answers_per_question` sampled answers each at the API's default temperature (1), as users get them. Pinned
requests are the operator's, not users': they carry no `user` id and no feedback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.hidden_preferences import HiddenPreference, Messages, last_question
from bench.stack_observer import send_retrying
from trainer.data import prompt_from_messages
from trainer.data.corpus import sample_prompts
from trainer.data.split import Side, prompt_key, side_of


@dataclass(frozen=True)
class EvalConfig:
    questions: int = 100  # distinct held-out questions, each asked once per version
    answers_per_question: int = 2  # `n` of each pinned request: 200 answers per version by default
    max_tokens: int = 64  # as the users' app; an answer cut there does not satisfy
    concurrency: int = 8  # pinned requests in flight at once (the engine batches them)
    seed: int = 0  # picks the questions and seeds every request (the same for every version)


def evaluation_questions(preference: HiddenPreference, config: EvalConfig) -> list[Messages]:
    """The first `questions` distinct held-out prompts of corpus seed 10**6 + seed at stake for the preference."""
    chosen: dict[str, Messages] = {}
    batch = 0
    while len(chosen) < config.questions:
        for messages in sample_prompts(1000, seed=10**6 + config.seed + 1000 * batch):
            key = prompt_key(prompt_from_messages(messages))
            if key in chosen or not preference.at_stake(last_question(messages)):
                continue
            if side_of(prompt_from_messages(messages)) == Side.HELDOUT:
                chosen[key] = messages
                if len(chosen) == config.questions:
                    break
        batch += 1
        if batch > 100:
            raise RuntimeError(f"fewer than {config.questions} held-out questions at stake for {preference.name}")
    return list(chosen.values())


@dataclass(frozen=True)
class Measurement:
    version: str
    satisfied: list[list[bool]]  # by question, by answer: question i is evaluation_questions(...)[i]
    answers: list[list[str]]
    truncated: int  # answers cut at max_tokens (they count as not satisfying)


async def measure_version(
    http: httpx.AsyncClient,
    version: str,
    questions: list[Messages],
    preference: HiddenPreference,
    config: EvalConfig,
    served_model: str = "rlhf-policy",
    on_answers: Callable[[int], None] = lambda n: None,
) -> Measurement:
    """Ask every question of `version`, pinned; `on_answers(k)` after each response of k answers."""
    limit = asyncio.Semaphore(config.concurrency)
    satisfied: list[list[bool]] = [[] for _ in questions]
    answers: list[list[str]] = [[] for _ in questions]
    truncated = 0

    async def ask(index: int, messages: Messages) -> None:
        nonlocal truncated
        body = {"model": f"{served_model}@{version}", "messages": messages, "n": config.answers_per_question,
                "seed": config.seed * 100_000 + index, "max_tokens": config.max_tokens}
        async with limit:
            response = await send_retrying(http, "POST", "/v1/chat/completions", json=body)
        response.raise_for_status()
        question = last_question(messages)
        for choice in response.json()["choices"]:
            text, cut = choice["message"]["content"], choice["finish_reason"] == "length"
            answers[index].append(text)
            satisfied[index].append(not cut and preference.satisfied(question, text))
            truncated += cut
        on_answers(len(response.json()["choices"]))

    await asyncio.gather(*(ask(i, messages) for i, messages in enumerate(questions)))
    return Measurement(version, satisfied, answers, truncated)
