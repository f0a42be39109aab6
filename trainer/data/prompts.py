"""The questions a round asks: PPO's from the train side of the split, the gate's from the judge side.

Users' prompts and corpus prompts alike are kept only if trainer.data.split puts them on the wanted side, so
the gate never asks a question PPO trained on, and neither asks a held-out one.
"""

from __future__ import annotations

from trainer.data import Prompt, prompt_from_messages
from trainer.data.corpus import sample_prompts
from trainer.data.split import DEFAULT_SPLIT, Side, SplitConfig, side_of

# How far corpus_prompts looks, in prompts drawn per prompt wanted, before it settles for fewer: the
# corpus repeats questions, and a side holds a share of them (judge: 0.3 by default).
MAX_DRAWS_PER_PROMPT = 64


def on_side(prompts: list[Prompt], side: Side, split: SplitConfig = DEFAULT_SPLIT) -> list[Prompt]:
    return [p for p in prompts if side_of(p, split) == side]


def corpus_prompts(side: Side, n: int, seed: int, split: SplitConfig = DEFAULT_SPLIT) -> list[Prompt]:
    """The first `n` distinct corpus prompts on `side` in sample_prompts' stream for `seed`."""
    found: dict[Prompt, None] = {}
    drawn = 2 * n
    while n > 0:
        for prompt in on_side([prompt_from_messages(m) for m in sample_prompts(drawn, seed)], side, split):
            found.setdefault(prompt)  # a larger draw starts with the smaller one: the same prompts, in order
            if len(found) == n:
                return list(found)
        if drawn >= MAX_DRAWS_PER_PROMPT * n:
            break
        drawn *= 2
    return list(found)


def mixed(users: list[Prompt], corpus: list[Prompt], limit: int | None = None) -> list[Prompt]:
    """Users' prompts first, then the corpus's, without repeats, at most `limit`."""
    return list(dict.fromkeys(users + corpus))[:limit]
