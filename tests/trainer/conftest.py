"""Trainer test fixtures: one thread for torch, and reward models of simulated users (tests/trainer/preferences)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.trainer.preferences import LENGTH, WORDING, HiddenPreference
from trainer.data.split import Side, split_dataset
from trainer.reward.reward_model import RewardModelConfig, train_reward_model


@contextmanager
def one_torch_thread():
    # Measured on the shared 2-core machine: the tiny model's forward + backward took 10 ms on one
    # thread and 1.2 s on two while other processes kept the cores busy (threads wait on each other).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def _train_rm(preference: HiddenPreference, base_model_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    """Trained on the user's feedback (seed 1) of the train and judge sides of the split, measured on the
    held-out side (here no gate needs a judge of its own)."""
    out = tmp_path_factory.mktemp(f"{preference.name}-rm")
    sides = split_dataset(preference.feedback(seed=1))
    with one_torch_thread():
        metrics = train_reward_model(base_model_dir, sides[Side.TRAIN] + sides[Side.JUDGE], out,
                                     RewardModelConfig(), heldout=sides[Side.HELDOUT])  # fmt: skip
    return out, metrics


@pytest.fixture(scope="session")
def length_rm(base_model_dir: Path, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A reward model trained on the feedback of a user who likes long answers, and its metrics."""
    return _train_rm(LENGTH, base_model_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def wording_rm(base_model_dir: Path, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """A reward model trained on the feedback of a user who likes polite wording, and its metrics."""
    return _train_rm(WORDING, base_model_dir, tmp_path_factory)


@pytest.fixture(scope="session", params=[LENGTH, WORDING], ids=lambda p: p.name)
def preference_rm(request) -> tuple[HiddenPreference, Path, dict[str, float]]:
    """Each hidden preference in turn, with its trained reward model and the model's metrics."""
    return request.param, *request.getfixturevalue(f"{request.param.name}_rm")
