"""The data stage: feedback from Kafka (ingest.py) into the store (store.py), split by prompt (split.py,
config `SplitConfig`), the questions a round asks (prompts.py) and the synthetic corpus (corpus.py).

This module: the training data the store hands to the learners: plain dataclasses, no Kafka, no SQL.

A prompt is the chat message list that was sent (dicts with role/content); a response is the text of
one answer. Learners apply the base model's chat template themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

Prompt = tuple[tuple[str, str], ...]  # ((role, content), ...): hashable, so prompts can be grouped


def prompt_from_messages(messages: list[dict]) -> Prompt:
    return tuple((m["role"], m["content"]) for m in messages)


def prompt_to_messages(prompt: Prompt) -> list[dict]:
    return [{"role": role, "content": content} for role, content in prompt]


def prompt_from_json(value: str | list[dict]) -> Prompt:
    """A prompt as JSONL files give it: one user message as a string, or a chat message list."""
    return prompt_from_messages([{"role": "user", "content": value}] if isinstance(value, str) else value)


def read_jsonl(path: Path) -> Iterator[dict]:
    """The objects of a JSON-lines file; blank lines are skipped, and a bad line names its place."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: {exc}") from None


@dataclass(frozen=True)
class PreferenceGroup:
    """The (chosen, rejected) pairs of one piece of feedback on one prompt (one pair, or a ranking's
    K-choose-2), kept together as one batch element: InstructGPT trains on all pairs of a ranking at once
    to avoid overfitting to a prompt."""

    prompt: Prompt
    pairs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PointwiseLabel:
    """One answer with a target probability of being good (thumbs up = 1, down = 0, Likert scaled)."""

    prompt: Prompt
    response: str
    target: float


@dataclass(frozen=True)
class Demonstration:
    """A prompt with the answer a user wrote (a correction): supervised fine-tuning data."""

    prompt: Prompt
    response: str


@dataclass
class RewardDataset:
    groups: list[PreferenceGroup] = field(default_factory=list)
    pointwise: list[PointwiseLabel] = field(default_factory=list)

    def __len__(self) -> int:
        return sum(len(g.pairs) for g in self.groups) + len(self.pointwise)

    def __add__(self, other: RewardDataset) -> RewardDataset:
        return RewardDataset(self.groups + other.groups, self.pointwise + other.pointwise)

    def elements(self) -> list[PreferenceGroup | PointwiseLabel]:
        """What the reward model trains on, one batch element each: the groups, then the labels."""
        return [*self.groups, *self.pointwise]


def load_demonstrations(path: Path) -> list[Demonstration]:
    """{"prompt": ..., "answer": "..."} per line (trainer.data.prompt_from_json reads the prompt)."""
    return [Demonstration(prompt_from_json(row["prompt"]), row["answer"]) for row in read_jsonl(path)]


def load_comparisons(path: Path) -> RewardDataset:
    """{"prompt": ..., "chosen": "...", "rejected": "..."} per line; each distinct line is one group of one
    pair (a line is one comparison: a repeated line is counted once, as repeated feedback is, and a line
    whose two answers are the same text teaches nothing and is skipped)."""
    pairs = {
        (prompt_from_json(row["prompt"]), row["chosen"], row["rejected"]): None
        for row in read_jsonl(path)
        if row["chosen"] != row["rejected"]
    }
    return RewardDataset(
        groups=[PreferenceGroup(prompt, ((chosen, rejected),)) for prompt, chosen, rejected in pairs]
    )


def load_prompts(path: Path) -> list[Prompt]:
    """{"prompt": ...} per line (other keys, such as an answer, are ignored)."""
    return [prompt_from_json(row["prompt"]) for row in read_jsonl(path)]
