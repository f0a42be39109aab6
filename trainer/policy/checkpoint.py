"""Step checkpoints of a PPO run, so that a run killed at any point resumes from its last completed step.

A checkpoint is a directory `step-000012/` in the run's checkpoint directory: the policy adapter in
`adapter/` (as PEFT saves it, loadable by vLLM) and `state.pt` (value head, optimizer state, KL
coefficient, the step's metrics and the config). It is written as `step-000012.tmp/` and renamed into
place, so a directory named `step-N` is always complete; older checkpoints are removed afterwards.

PPO draws every random choice of a step from a seed derived from (config seed, step) (ppo.step_seed), so
the step number is the whole data position: nothing else needs saving to draw what an uninterrupted run
would have drawn.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import PeftModel

ADAPTER_DIR = "adapter"
STATE_FILE = "state.pt"


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def latest(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint in `checkpoint_dir`, or None."""
    done = [p for p in Path(checkpoint_dir).glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return max(done, key=_step_of, default=None)


def save(checkpoint_dir: Path, step: int, policy: PeftModel, state: dict) -> Path:
    """Write the checkpoint of `step` (the adapter and `state`), then drop the older ones."""
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step-{step:06d}"
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a kill in the middle of writing
    policy.save_pretrained(staging / ADAPTER_DIR, selected_adapters=["default"])
    torch.save(state, staging / STATE_FILE)
    staging.rename(final)
    for old in checkpoint_dir.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE_FILE, weights_only=True)
