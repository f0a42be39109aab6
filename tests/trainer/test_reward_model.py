"""The reward model: its losses by hand, then learning two hidden preferences on the tiny base model."""

from __future__ import annotations

import math

import torch

from trainer.data import PointwiseLabel, PreferenceGroup, RewardDataset
from trainer.reward_model import (
    RewardModel,
    RewardModelConfig,
    pairwise_loss,
    pointwise_loss,
    train_reward_model,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pairwise_loss_averages_within_each_group_then_over_groups():
    # Group 0 ranks three answers with rewards 2 > 1 > 0: its 3 pairs have margins 1, 2, 1 and
    # -log sigmoid(m) = softplus(-m), mean (2 softplus(-1) + softplus(-2)) / 3.
    # Group 1 is a single pair with rewards 0 vs 3: softplus(3).
    # Each group weighs the same: loss = (group 0 + group 1) / 2, not the mean of the 4 pairs.
    chosen = torch.tensor([2.0, 2.0, 1.0, 0.0])
    rejected = torch.tensor([1.0, 0.0, 0.0, 3.0])
    group = torch.tensor([0, 0, 0, 1])
    group0 = (2 * softplus(-1) + softplus(-2)) / 3
    expected = (group0 + softplus(3)) / 2
    torch.testing.assert_close(pairwise_loss(chosen, rejected, group), torch.tensor(expected))
    # group ids need not be contiguous
    torch.testing.assert_close(pairwise_loss(chosen, rejected, group * 7 + 3), torch.tensor(expected))


def test_pointwise_loss_is_binary_cross_entropy_of_the_reward_as_logit():
    # r = 0 -> p = 0.5 -> -log 0.5 whatever the target; r = 2, target 1 -> -log sigmoid(2) = softplus(-2)
    rewards, targets = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    expected = (math.log(2) + softplus(-2)) / 2
    torch.testing.assert_close(pointwise_loss(rewards, targets), torch.tensor(expected))


def accuracy(model: RewardModel, data: RewardDataset) -> tuple[float, float]:
    """Pairwise and pointwise accuracy of `model` on `data`."""
    pairs = [(g.prompt, winner, loser) for g in data.groups for winner, loser in g.pairs]
    chosen = model.score([p for p, _, _ in pairs], [winner for _, winner, _ in pairs])
    rejected = model.score([p for p, _, _ in pairs], [loser for _, _, loser in pairs])
    scores = model.score([x.prompt for x in data.pointwise], [x.response for x in data.pointwise])
    targets = torch.tensor([x.target for x in data.pointwise])
    return (chosen > rejected).float().mean().item(), ((scores > 0) == (targets > 0.5)).float().mean().item()


def test_reward_model_learns_each_hidden_preference(base_model_dir, preference_rm):
    preference, rm_dir, metrics = preference_rm
    # Fresh feedback of the same user (another seed): the untrained model is at chance, the trained one not.
    unseen = preference.feedback(seed=2, n_labels=200, n_groups=50)
    before = accuracy(RewardModel.create(base_model_dir, RewardModelConfig()), unseen)
    after = accuracy(RewardModel.load(base_model_dir, rm_dir), unseen)
    figures = (
        f"{preference.name}: pairwise/pointwise accuracy on unseen feedback before {before}, after {after}; "
        f"training metrics {metrics}"
    )
    assert metrics["heldout_pairwise_accuracy"] > 0.8 and metrics["heldout_pointwise_accuracy"] > 0.8, figures
    assert after[0] > 0.8 and after[1] > 0.8, figures
    assert after[0] - before[0] > 0.2 and after[1] - before[1] > 0.2, figures
    assert metrics["heldout_pairs"] > 0 and metrics["heldout_pointwise"] > 0, figures
    assert metrics["train_pairs"] + metrics["heldout_pairs"] == sum(
        len(g.pairs) for g in preference.feedback(seed=1).groups
    )
    print(figures)


def test_saved_reward_model_reloads_and_continues(base_model_dir, length_rm, tmp_path):
    rm_dir, _ = length_rm
    prompt = (("user", "Tell me about cats."),)
    answers = ["Cats.", "Cats are small animals with soft fur. Many people keep cats as pets."]
    first = RewardModel.load(base_model_dir, rm_dir).score([prompt, prompt], answers)
    again = RewardModel.load(base_model_dir, rm_dir).score([prompt, prompt], answers)
    torch.testing.assert_close(first, again)
    assert first.shape == (2,) and first[1] > first[0], first

    # Continue from it on new feedback that says the opposite: the same answers change scores.
    flipped = RewardDataset(
        groups=[PreferenceGroup(prompt, ((answers[0], answers[1]),))],
        pointwise=[PointwiseLabel(prompt, answers[1], 0.0), PointwiseLabel(prompt, answers[0], 1.0)],
    )
    config = RewardModelConfig(epochs=20, lr=1e-3)
    metrics = train_reward_model(base_model_dir, flipped, tmp_path / "rm2", config, init_from=rm_dir)
    continued = RewardModel.load(base_model_dir, tmp_path / "rm2").score([prompt, prompt], answers)
    assert continued[1] - continued[0] < first[1] - first[0], (first, continued, metrics)
    assert metrics["train_pairs"] + metrics["heldout_pairs"] == 1
