"""Which side of the data split a prompt is on: one rule for every kind of feedback, stable across rounds.

Three sides, decided by a salted hash of the prompt's last user message (case and spacing folded), so the
same question asked under another system message or after other turns lands on the same side:

- train: the policy's reward model learns from it, and PPO samples its prompts;
- judge: the evaluation gate's reward model learns from it, and the gate samples its prompts. PPO never
  optimises against the judge and never sees its prompts, so reward hacking cannot pass as gain;
- heldout: nobody trains on it; it measures both reward models' accuracy.

The hash does not depend on the data or on the round, so a prompt never changes side as feedback grows.
Changing `salt` or the fractions reshuffles every side: do it only with a fresh store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum

from trainer.data import Prompt, RewardDataset


class Side(StrEnum):
    TRAIN = "train"
    JUDGE = "judge"
    HELDOUT = "heldout"


@dataclass(frozen=True)
class SplitConfig:
    # Share of prompts whose feedback trains the gate's judge reward model (and whose questions the gate
    # asks). A third of the data keeps the judge informed enough to see a 0.15 preference-rate change.
    judge_fraction: float = 0.3
    # Share of prompts nobody trains on: both reward models' held-out accuracy.
    heldout_fraction: float = 0.1
    # Part of the hash: a new salt is a new split.
    salt: str = "rlhf-split-v1"

    def __post_init__(self) -> None:
        if min(self.judge_fraction, self.heldout_fraction) < 0 or self.judge_fraction + self.heldout_fraction >= 1:
            raise ValueError("judge and heldout fractions must be >= 0 and leave some data to train on")


DEFAULT_SPLIT = SplitConfig()


def prompt_key(prompt: Prompt) -> str:
    """What the split hashes: the last user message, case and spacing folded."""
    user_turns = [content for role, content in prompt if role == "user"]
    return " ".join((user_turns[-1] if user_turns else "").lower().split())


def side_of(prompt: Prompt, config: SplitConfig = DEFAULT_SPLIT) -> Side:
    digest = hashlib.sha256(f"{config.salt}:{prompt_key(prompt)}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < config.heldout_fraction:
        return Side.HELDOUT
    if position < config.heldout_fraction + config.judge_fraction:
        return Side.JUDGE
    return Side.TRAIN


def split_dataset(data: RewardDataset, config: SplitConfig = DEFAULT_SPLIT) -> dict[Side, RewardDataset]:
    """`data` cut into the three sides, every group and pointwise label by its prompt."""
    sides = {side: RewardDataset() for side in Side}
    for group in data.groups:
        sides[side_of(group.prompt, config)].groups.append(group)
    for label in data.pointwise:
        sides[side_of(label.prompt, config)].pointwise.append(label)
    return sides
