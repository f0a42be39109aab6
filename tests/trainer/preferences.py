"""Simulated users: feedback from a hidden preference that the test chooses, made from the base model's corpus.

A hidden preference is a predicate on answers: does this answer satisfy the user? Its feedback is
pointwise thumbs on corpus answers (up when satisfied) and preference groups of several answers to one
question, every pair with the satisfying answer (or, for length, the longer one) chosen. The learning tests
check that a reward model learns the preference and that PPO raises the rate at which sampled answers
satisfy it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# The predicates are the demo's (bench/hidden_preferences.py): one definition of each preference.
from bench.hidden_preferences import LONG_ANSWER_WORDS, POLITE_WORDS, is_long, is_polite, words  # noqa: F401
from trainer.data import PointwiseLabel, PreferenceGroup, Prompt, RewardDataset, prompt_from_messages
from trainer.data.corpus import CLOSERS, FAMILIES, OPENERS, generate_dialogues


def _question(rng: random.Random) -> tuple[Prompt, list[str]]:
    question, phrasings = FAMILIES[rng.choice(sorted(FAMILIES))](rng)
    return prompt_from_messages([{"role": "user", "content": question}]), phrasings


def _thumbs(satisfied: Callable[[str], bool], seed: int, n_labels: int) -> list[PointwiseLabel]:
    """Thumbs up or down on the last answer of corpus dialogues."""
    return [
        PointwiseLabel(prompt_from_messages(d[:-1]), d[-1]["content"], float(satisfied(d[-1]["content"])))
        for d in generate_dialogues(n_labels, seed)
    ]


def length_preference_data(seed: int, n_labels: int = 400, n_groups: int = 100) -> RewardDataset:
    """A user who likes long answers: thumbs up on long answers, groups ranked longest first.

    Groups: a question of a random task family with its phrasings (short to long), every one of the
    K-choose-2 pairs with the longer answer chosen.
    """
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        prompt, phrasings = _question(rng)
        ranked = sorted(set(phrasings), key=lambda answer: (-words(answer), answer))
        pairs = tuple((a, b) for i, a in enumerate(ranked) for b in ranked[i + 1 :] if words(a) > words(b))
        if pairs:
            groups.append(PreferenceGroup(prompt, pairs))
    return RewardDataset(groups=groups, pointwise=_thumbs(is_long, seed, n_labels))


def wording_preference_data(seed: int, n_labels: int = 400, n_groups: int = 100) -> RewardDataset:
    """A user who likes polite wording (POLITE_WORDS), whatever the length.

    Groups: two answers to a question with a polite pleasantry, two with a neutral one or none, every
    polite one chosen over every other. The polite answers are built on the shortest phrasing and the
    others on random ones, so that length does not tell them apart (if anything it points the other way).
    """
    polite = [p for p in OPENERS + CLOSERS if is_polite(p)]
    neutral = [p for p in OPENERS if not is_polite(p)]
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        prompt, phrasings = _question(rng)
        liked = {f"{rng.choice(polite)} {phrasings[0]}", f"{phrasings[0]} {rng.choice(polite)}"}
        disliked = {rng.choice(phrasings), f"{rng.choice(neutral)} {rng.choice(phrasings)}"}
        pairs = tuple((a, b) for a in sorted(liked) for b in sorted(disliked) if not is_polite(b))
        if pairs:  # small talk's own replies can be polite already
            groups.append(PreferenceGroup(prompt, pairs))
    return RewardDataset(groups=groups, pointwise=_thumbs(is_polite, seed, n_labels))


@dataclass(frozen=True)
class HiddenPreference:
    name: str
    satisfied: Callable[[str], bool]
    feedback: Callable[..., RewardDataset]  # (seed, n_labels=..., n_groups=...) -> the user's feedback


LENGTH = HiddenPreference("length", is_long, length_preference_data)
WORDING = HiddenPreference("wording", is_polite, wording_preference_data)
