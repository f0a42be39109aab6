"""The reward model: its losses by hand, on the model's device, then learning two hidden preferences on the
tiny base model, from scratch and incrementally."""

from __future__ import annotations

import math
import time

import pytest
import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModel

from tests.trainer.preferences import HiddenPreference
from trainer.adapters import lora_config
from trainer.data import PointwiseLabel, PreferenceGroup, RewardDataset
from trainer.data.split import Side, split_dataset
from trainer.evaluation.intervals import wilson_interval
from trainer.reward.reward_model import (
    RewardModel,
    RewardModelConfig,
    batch_loss,
    heldout_metrics,
    pairwise_loss,
    pointwise_loss,
    pointwise_pairs,
    train_reward_model,
    training_elements,
)
from trainer.tokens import load_tokenizer

PROMPT = (("user", "Tell me about cats."),)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_pairwise_loss_averages_within_each_group():
    # Group 0 ranks three answers with rewards 2 > 1 > 0: its 3 pairs have margins 1, 2, 1 and
    # -log sigmoid(m) = softplus(-m), mean (2 softplus(-1) + softplus(-2)) / 3.
    # Group 1 is a single pair with rewards 0 vs 3: softplus(3).
    chosen = torch.tensor([2.0, 2.0, 1.0, 0.0])
    rejected = torch.tensor([1.0, 0.0, 0.0, 3.0])
    group = torch.tensor([0, 0, 0, 1])
    expected = [(2 * softplus(-1) + softplus(-2)) / 3, softplus(3)]
    torch.testing.assert_close(pairwise_loss(chosen, rejected, group, 2), torch.tensor(expected))


def test_pointwise_loss_is_binary_cross_entropy_of_the_reward_as_logit():
    # r = 0 -> p = 0.5 -> -log 0.5 whatever the target; r = 2, target 1 -> -log sigmoid(2) = softplus(-2)
    rewards, targets = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(pointwise_loss(rewards, targets), torch.tensor([math.log(2), softplus(-2)]))


class TableModel:
    """A stand-in reward model whose reward for each answer is looked up in a table."""

    def __init__(self, rewards: dict[str, float]):
        self.rewards = rewards

    def encode(self, prompts, responses):
        return torch.tensor([self.rewards[response] for response in responses]), None

    def __call__(self, rewards, _mask):
        return rewards

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


RANKING = PreferenceGroup(PROMPT, (("best", "middle"), ("best", "worst"), ("middle", "worst")))
TABLE = TableModel({"best": 2.0, "middle": 1.0, "worst": 0.0, "fine": 0.0, "poor": 3.0})


def test_a_batch_weighs_each_piece_of_feedback_the_same_whatever_its_kind():
    # One ranking (its mean pair loss as above) and two thumbs: "fine" r = 0 up -> log 2, "poor" r = 3
    # down -> -log(1 - sigmoid(3)) = softplus(3). Loss = (ranking + w * (log 2 + softplus(3))) / 3 elements.
    elements = [RANKING, PointwiseLabel(PROMPT, "fine", 1.0), PointwiseLabel(PROMPT, "poor", 0.0)]
    ranking = (2 * softplus(-1) + softplus(-2)) / 3
    loss, _ = batch_loss(TABLE, elements, pointwise_weight=0.5)
    assert loss.item() == pytest.approx((ranking + 0.5 * (math.log(2) + softplus(3))) / 3)
    # A data-parallel rank's share of a batch of 6 is divided by 6, so the ranks' losses sum to the batch's.
    share, _ = batch_loss(TABLE, elements, pointwise_weight=0.5, batch_size=6)
    assert share.item() == pytest.approx(loss.item() / 2)


def test_heldout_accuracy_is_reported_with_its_interval_only_from_min_heldout_comparisons():
    # The ranking: "best" 2 > "middle" 1 > "worst" 0, all 3 pairs right. Thumbs: "poor" (r = 3) up is
    # right, "fine" (r = 0) up is wrong (r > 0 is needed), a neutral 0.5 label is not counted.
    data = RewardDataset(
        groups=[RANKING, PreferenceGroup(PROMPT, (("worst", "best"),))],  # the last pair is wrong
        pointwise=[PointwiseLabel(PROMPT, "poor", 1.0), PointwiseLabel(PROMPT, "fine", 1.0),
                   PointwiseLabel(PROMPT, "fine", 0.5)],  # fmt: skip
    )
    few = heldout_metrics(TABLE, data, batch_size=2, min_heldout=5)
    assert few == {"heldout_enough": 0.0, "heldout_pairwise_n": 4.0, "heldout_pointwise_n": 2.0,
                   "heldout_ranking_n": 4.0}  # fmt: skip
    enough = heldout_metrics(TABLE, data, batch_size=2, min_heldout=4)
    low, high = wilson_interval(3, 4)
    # No thumbs down here, so the ranking kind holds the pairwise pairs alone.
    assert enough == {"heldout_enough": 1.0, "heldout_pairwise_n": 4.0, "heldout_pointwise_n": 2.0,
                      "heldout_pairwise_accuracy": 0.75, "heldout_pairwise_low": low,
                      "heldout_pairwise_high": high, "heldout_ranking_n": 4.0,
                      "heldout_ranking_accuracy": 0.75, "heldout_ranking_low": low,
                      "heldout_ranking_high": high}  # fmt: skip


def test_heldout_ranking_pairs_liked_and_disliked_answers_of_one_prompt_each_label_once():
    other = (("user", "Another question?"),)
    labels = [PointwiseLabel(PROMPT, "poor", 1.0), PointwiseLabel(PROMPT, "fine", 0.0),
              PointwiseLabel(PROMPT, "best", 0.0), PointwiseLabel(PROMPT, "middle", 0.5),
              PointwiseLabel(other, "worst", 1.0), PointwiseLabel(other, "middle", 0.0)]  # fmt: skip
    assert pointwise_pairs(labels) == [(labels[0], labels[1]), (labels[4], labels[5])]
    # poor (3) over fine (0) is right, worst (0) over middle (1) is wrong; "best" found no partner.
    metrics = heldout_metrics(TABLE, RewardDataset(pointwise=labels), batch_size=3, min_heldout=2)
    assert metrics["heldout_ranking_n"] == 2.0 and metrics["heldout_ranking_accuracy"] == 0.5


def test_incremental_training_replays_a_sample_of_the_old_data_and_a_full_retrain_all_of_it():
    new = RewardDataset(pointwise=[PointwiseLabel(PROMPT, f"new {i}", 1.0) for i in range(3)])
    old = RewardDataset(
        groups=[PreferenceGroup(PROMPT, ((f"a {i}", f"b {i}"),)) for i in range(5)],
        pointwise=[PointwiseLabel(PROMPT, f"old {i}", 0.0) for i in range(5)],
    )
    config = RewardModelConfig(replay_ratio=2.0)
    incremental = training_elements(new, old, config, incremental=True)
    assert incremental[:3] == new.elements() and len(incremental) == 3 + 6
    assert set(incremental[3:]) <= set(old.elements()) and len(set(incremental[3:])) == 6
    assert training_elements(new, old, config, incremental=False) == new.elements() + old.elements()
    capped = training_elements(new, old, RewardModelConfig(replay_ratio=10.0), incremental=True)
    assert sorted(map(repr, capped[3:])) == sorted(map(repr, old.elements()))


DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_losses_and_forward_build_every_tensor_on_the_models_device(base_model_dir, device):
    # On `meta` (no data) a tensor made on the CPU by mistake fails as it would on a GPU: devices differ.
    # Eager attention: SDPA's mask check reads tensor values, which meta tensors do not have.
    model_config = AutoConfig.from_pretrained(base_model_dir, attn_implementation="eager")
    with torch.device(device):
        trunk = AutoModel.from_config(model_config)
        head = nn.Linear(model_config.hidden_size, 1)
    config = RewardModelConfig(max_length=64)
    model = RewardModel(get_peft_model(trunk, lora_config(config)), head, load_tokenizer(base_model_dir), 64)
    elements = [RANKING, PointwiseLabel(PROMPT, "fine", 1.0), PreferenceGroup(PROMPT, (("best", "poor"),))]
    loss, out = batch_loss(model, elements, pointwise_weight=1.0)
    loss.backward()
    assert {loss.device.type, out["chosen"].device.type, out["targets"].device.type} == {device}
    assert head.weight.grad is not None and head.weight.grad.device.type == device


def accuracy(model: RewardModel, data: RewardDataset) -> tuple[float, float]:
    """Pairwise and pointwise accuracy of `model` on `data`."""
    pairs = [(g.prompt, winner, loser) for g in data.groups for winner, loser in g.pairs]
    chosen = model.score([p for p, _, _ in pairs], [winner for _, winner, _ in pairs])
    rejected = model.score([p for p, _, _ in pairs], [loser for _, _, loser in pairs])
    scores = model.score([x.prompt for x in data.pointwise], [x.response for x in data.pointwise])
    targets = torch.tensor([x.target for x in data.pointwise])
    return (chosen > rejected).float().mean().item(), ((scores > 0) == (targets > 0.5)).float().mean().item()


def interval(metrics: dict[str, float], kind: str) -> str:
    n, accuracy = int(metrics[f"heldout_{kind}_n"]), metrics.get(f"heldout_{kind}_accuracy", math.nan)
    return f"{kind} {accuracy:.3f} [{metrics.get(f'heldout_{kind}_low', math.nan):.3f}, " \
           f"{metrics.get(f'heldout_{kind}_high', math.nan):.3f}] of {n}"  # fmt: skip


def test_reward_model_learns_each_hidden_preference(base_model_dir, preference_rm):
    preference, rm_dir, metrics = preference_rm
    # Fresh feedback of the same user (another seed): the untrained model is at chance, the trained one not.
    unseen = preference.feedback(seed=2, n_labels=200, n_groups=50)
    before = accuracy(RewardModel.create(base_model_dir, RewardModelConfig()), unseen)
    after = accuracy(RewardModel.load(base_model_dir, rm_dir), unseen)
    figures = (
        f"{preference.name}: held-out {interval(metrics, 'pairwise')}, {interval(metrics, 'pointwise')}; "
        f"pairwise/pointwise accuracy on unseen feedback before {before}, after {after}; metrics {metrics}"
    )
    assert metrics["heldout_enough"] == 1.0, figures
    assert metrics["heldout_pairwise_low"] > 0.7 and metrics["heldout_pointwise_low"] > 0.7, figures
    assert after[0] > 0.8 and after[1] > 0.8, figures
    assert after[0] - before[0] > 0.2 and after[1] - before[1] > 0.2, figures
    sides = split_dataset(preference.feedback(seed=1))
    trained, heldout = sides[Side.TRAIN] + sides[Side.JUDGE], sides[Side.HELDOUT]
    assert (metrics["train_pairs"], metrics["heldout_pairwise_n"]) == (
        sum(len(g.pairs) for g in trained.groups),
        sum(len(g.pairs) for g in heldout.groups),
    )
    print(figures)


def test_saved_reward_model_reloads_and_continues(base_model_dir, length_rm, tmp_path):
    rm_dir, _ = length_rm
    answers = ["Cats.", "Cats are small animals with soft fur. Many people keep cats as pets."]
    first = RewardModel.load(base_model_dir, rm_dir).score([PROMPT, PROMPT], answers)
    again = RewardModel.load(base_model_dir, rm_dir).score([PROMPT, PROMPT], answers)
    torch.testing.assert_close(first, again)
    assert first.shape == (2,) and first[1] > first[0], first

    # Continue from it on new feedback that says the opposite: the same answers change scores.
    flipped = RewardDataset(
        groups=[PreferenceGroup(PROMPT, ((answers[0], answers[1]),))],
        pointwise=[PointwiseLabel(PROMPT, answers[1], 0.0), PointwiseLabel(PROMPT, answers[0], 1.0)],
    )
    config = RewardModelConfig(epochs=20, lr=1e-3)
    metrics = train_reward_model(base_model_dir, flipped, tmp_path / "rm2", config, init_from=rm_dir)
    continued = RewardModel.load(base_model_dir, tmp_path / "rm2").score([PROMPT, PROMPT], answers)
    assert continued[1] - continued[0] < first[1] - first[0], (first, continued, metrics)
    assert (metrics["train_new"], metrics["train_replayed"], metrics["train_pairs"]) == (3, 0, 1)
    # No held-out data: no accuracy, and it says so.
    assert metrics["heldout_enough"] == 0.0 and "heldout_pairwise_accuracy" not in metrics


def timed(train) -> tuple[dict[str, float], float]:
    """The metrics of `train()` and the CPU seconds it took (this process's, so that other processes on
    the shared cores do not blur the comparison; the wall-clock `seconds` are in the metrics)."""
    started = time.process_time()
    metrics = train()
    return metrics, time.process_time() - started


def held_out(preference: HiddenPreference, seed: int) -> RewardDataset:
    return split_dataset(preference.feedback(seed=seed, n_labels=2000, n_groups=500))[Side.HELDOUT]


def test_incremental_training_matches_a_full_retrain_at_a_fraction_of_its_cost(
    base_model_dir, preference_rm, tmp_path
):
    # Round 1 trained on chunk 1 (the fixture: the user's feedback of seed 1, train and judge sides). Round
    # 2's new feedback, chunk 2, is a quarter as large. Incrementally, round 2 continues round 1's model on
    # chunk 2 and as much of chunk 1 replayed; a full retrain starts afresh on chunks 1 and 2. Both are
    # measured on held-out prompts of a third seed (about 200 labels and 75-150 pairs).
    preference, round_1, _ = preference_rm
    chunks = [split_dataset(preference.feedback(seed=1)), split_dataset(preference.feedback(3, 100, 25))]
    old, new = (chunk[Side.TRAIN] + chunk[Side.JUDGE] for chunk in chunks)
    heldout = held_out(preference, seed=2)
    def train(out: str, init_from=None) -> dict[str, float]:
        config = RewardModelConfig()
        return train_reward_model(base_model_dir, new, tmp_path / out, config, init_from, replay=old,
                                  heldout=heldout)  # fmt: skip

    full, full_cpu = timed(lambda: train("full"))
    incremental, incremental_cpu = timed(lambda: train("incremental", init_from=round_1))
    figures = f"{preference.name}: " + "; ".join(
        f"{name} {interval(m, 'pairwise')}, {interval(m, 'pointwise')}, "
        f"{m['train_new'] + m['train_replayed']:.0f} elements, {cpu:.1f} CPU s ({m['seconds']:.1f} s wall)"
        for name, m, cpu in [("full retrain", full, full_cpu), ("incremental", incremental, incremental_cpu)]
    ) + (f"; cost ratio {incremental_cpu / full_cpu:.2f} CPU, "
         f"{incremental['seconds'] / full['seconds']:.2f} wall")  # fmt: skip
    print(figures)
    assert full["heldout_enough"] == incremental["heldout_enough"] == 1.0, figures
    assert full["heldout_pairwise_low"] > 0.7 and full["heldout_pointwise_low"] > 0.7, figures
    for kind in ("pairwise", "pointwise"):  # not worse than the full retrain beyond its 95% interval
        assert incremental[f"heldout_{kind}_accuracy"] >= full[f"heldout_{kind}_low"], figures
    assert incremental["train_replayed"] == incremental["train_new"] == full["train_new"], figures
    assert incremental_cpu / full_cpu < 0.7, figures
