"""The evaluation gate: its statistic in simulation, its judge check, its reasons on the admin API, and a
reward-hacking policy that its own reward model likes and the judge rejects."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from common.registry import PolicyRegistry
from serving.app import build_app
from serving.settings import ServingSettings
from tests.serving.fakes import FakeEngine, MemoryEventSink
from tests.trainer.preferences import LENGTH
from trainer.data import PointwiseLabel, PreferenceGroup, RewardDataset
from trainer.data.corpus import generate_dialogues
from trainer.data.prompts import corpus_prompts
from trainer.data.split import Side, split_dataset
from trainer.evaluation.gate import (
    EvalConfig,
    clustered_gain,
    evaluate_candidate,
    judge_check,
    sample_and_score,
)
from trainer.policy.ppo import PPOConfig, load_policy, train_ppo
from trainer.policy.rollout import HFRollout
from trainer.reward.reward_model import RewardModel, RewardModelConfig, train_reward_model
from trainer.tokens import load_tokenizer

# --- The statistic, in simulation ---------------------------------------------------------------------

PROMPTS, ANSWERS = 64, 4  # the gate's default sample: EvalConfig.prompts x samples_per_prompt


def paired_differences(runs: int, shift_se: float, seed: int) -> tuple[torch.Tensor, float]:
    """`runs` gate samples of candidate-minus-parent rewards, prompt-major, with a per-prompt effect as
    large as the per-answer noise (u_p + e_pa, both N(0, 1)), shifted by `shift_se` true standard errors
    of the mean; and that standard error."""
    generator = torch.Generator().manual_seed(seed)
    per_prompt = torch.randn(runs, PROMPTS, 1, generator=generator)
    per_answer = torch.randn(runs, PROMPTS, ANSWERS, generator=generator)
    true_se = math.sqrt((1 + 1 / ANSWERS) / PROMPTS)
    return (per_prompt + per_answer + shift_se * true_se).reshape(runs, -1), true_se


def test_the_clustered_standard_error_covers_where_the_naive_one_does_not():
    runs = 20_000
    differences, _ = paired_differences(runs, shift_se=0.0, seed=0)
    zeros = torch.zeros(PROMPTS * ANSWERS)
    gains, clustered = torch.tensor([clustered_gain(d, zeros, ANSWERS) for d in differences]).T
    naive = differences.std(dim=1) / math.sqrt(PROMPTS * ANSWERS)  # every answer taken as independent

    # 95% intervals: the clustered one covers the true mean (0) about 95% of the time (Student's t with 63
    # degrees of freedom: 94.5%); the naive one, here 0.63 times too small, about 78%. Monte Carlo s.e. of
    # a coverage: 0.15 points.
    clustered_cover = (gains.abs() < 1.96 * clustered).double().mean().item()
    naive_cover = (gains.abs() < 1.96 * naive).double().mean().item()
    # The gate's rule (reject below -3 s.e.) on a candidate equal to its parent: Phi(-3) = 0.13% normal,
    # 0.19% t(63) with the clustered s.e.; about 2.9% with the naive one.
    clustered_rejects = (gains < -3 * clustered).double().mean().item()
    naive_rejects = (gains < -3 * naive).double().mean().item()
    figures = (f"coverage clustered {clustered_cover:.3f}, naive {naive_cover:.3f}; equal candidate rejected "
               f"clustered {clustered_rejects:.4f}, naive {naive_rejects:.4f} ({runs} runs)")  # fmt: skip
    print(figures)
    assert 0.935 < clustered_cover < 0.955 and naive_cover < 0.82, figures
    assert clustered_rejects < 0.004 and naive_rejects > 0.02, figures


def test_the_gate_rejects_a_candidate_worse_by_four_standard_errors_about_84_percent_of_the_time():
    runs = 4_000
    differences, true_se = paired_differences(runs, shift_se=-4.0, seed=1)
    zeros = torch.zeros(PROMPTS * ANSWERS)
    gains, ses = torch.tensor([clustered_gain(d, zeros, ANSWERS) for d in differences]).T
    power = (gains < -3 * ses).double().mean().item()
    print(f"rejected {power:.3f} of candidates worse by 4 s.e. ({4 * true_se:.3f}); Phi(1) = 0.841")
    assert 0.79 < power < 0.87  # t(63) and the estimated s.e. make it a little lower than Phi(1)


def test_a_clustered_standard_error_needs_two_prompts():
    with pytest.raises(ValueError, match="two prompts"):
        clustered_gain(torch.ones(4), torch.zeros(4), 4)


# --- The judge check ----------------------------------------------------------------------------------


def test_the_judge_passes_only_when_its_held_out_ranking_accuracy_is_above_chance():
    config = EvalConfig()
    too_few = {"heldout_enough": 0.0, "heldout_ranking_n": 12.0}
    only_pointwise = {"heldout_enough": 1.0, "heldout_ranking_n": 0.0, "heldout_pointwise_accuracy": 0.9}
    chance = {"heldout_enough": 1.0, "heldout_ranking_n": 30.0, "heldout_ranking_accuracy": 0.6,
              "heldout_ranking_low": 0.42, "heldout_ranking_high": 0.75}  # fmt: skip
    good = {**chance, "heldout_ranking_accuracy": 0.8, "heldout_ranking_low": 0.63,
            "heldout_ranking_high": 0.9}  # fmt: skip
    assert judge_check(too_few, config) == (
        False, "fail judge: 12 held-out comparisons, too few to validate it"
    )  # fmt: skip
    # Pointwise accuracy can be won by matching the base rate of thumbs up: it does not show ranking.
    assert judge_check(only_pointwise, config)[0] is False
    assert judge_check(chance, config) == (
        False, "fail judge: held-out ranking accuracy 0.60 (95% 0.42-0.75, n=30), lower bound not above 0.5"
    )  # fmt: skip
    assert judge_check(good, config) == (
        True, "pass judge: held-out ranking accuracy 0.80 (95% 0.63-0.90, n=30)"
    )  # fmt: skip
    unrequired = EvalConfig(require_validated_judge=False)
    assert judge_check(too_few, unrequired)[0] and judge_check(chance, unrequired)[0]
    assert judge_check(too_few, unrequired)[1].startswith("info judge: 12 held-out comparisons")


# --- The reasons on the admin API ---------------------------------------------------------------------


def test_the_admin_api_shows_each_versions_gate_reasons(tmp_path):
    registry = PolicyRegistry(tmp_path / "registry")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    reasons = ["pass judge: held-out pairwise accuracy 0.80", "pass judge gain: +0.120", "pass kl: 2.10"]
    registry.publish(adapter, base_model="base", parent="v0", metrics={"eval/passed": 1.0}, gate=reasons)
    registry.publish(adapter, base_model="base", parent="v1", metrics={})  # published without the gate

    settings = ServingSettings(registry_dir=tmp_path / "registry", follow_policy_topic=False)
    app = build_app(settings, FakeEngine, MemoryEventSink)
    with TestClient(app) as client:
        state = client.get("/v1/admin/policy").json()
    assert state["versions"] == ["v0", "v1", "v2"] and state["gates"] == {"v1": reasons}


# --- Reward hacking -----------------------------------------------------------------------------------


def opposite(data: RewardDataset) -> RewardDataset:
    """The feedback of a user who wants the opposite: every pair reversed, every label flipped."""
    return RewardDataset(
        groups=[PreferenceGroup(g.prompt, tuple((b, a) for a, b in g.pairs)) for g in data.groups],
        pointwise=[PointwiseLabel(x.prompt, x.response, 1 - x.target) for x in data.pointwise],
    )


@pytest.mark.slow
def test_the_gate_rejects_a_policy_its_own_reward_model_likes_and_the_judge_does_not(
    base_model_dir, tmp_path
):
    # The users like long answers (tests/trainer/preferences.LENGTH). The policy's reward model learned the
    # opposite from its side of the split (a stand-in for any reward model PPO can exploit); the judge
    # learned the truth from its own side. Both are measured on the held-out side.
    sides = split_dataset(LENGTH.feedback(seed=1))
    policy_rm, judge = tmp_path / "policy_rm", tmp_path / "judge"
    policy_rm_metrics = train_reward_model(base_model_dir, opposite(sides[Side.TRAIN]), policy_rm,
                                           RewardModelConfig(), heldout=sides[Side.HELDOUT])  # fmt: skip
    judge_metrics = train_reward_model(base_model_dir, sides[Side.JUDGE], judge, RewardModelConfig(),
                                       heldout=sides[Side.HELDOUT])  # fmt: skip

    # PPO on train-side prompts against the policy's reward model, with the shipped defaults (hf rollouts).
    # Measured (tiny base, 100 s on the shared 2 cores): the policy RM's gain +0.51 (s.e. 0.10), the
    # judge's -0.055 (clustered s.e. 0.015: rejected at -3.8 s.e.), KL 2.6; long answers 0.395 -> 0.262.
    tokenizer = load_tokenizer(base_model_dir)
    ptx_texts = [tokenizer.apply_chat_template(d, tokenize=False) for d in generate_dialogues(32, seed=5)]
    config = PPOConfig(rollout_backend="hf", seed=0)
    history: list[dict] = []
    ppo_prompts = corpus_prompts(Side.TRAIN, 64, seed=0)
    train_ppo(base_model_dir, policy_rm, ppo_prompts, tmp_path / "adapter", config, ptx_texts=ptx_texts,
              on_step=history.append)  # fmt: skip

    # The gate on judge-side prompts: the PPO policy against its parent (the base), then the base as a
    # successor of the PPO policy, then the PPO policy under a KL bound below its KL.
    gate_config = EvalConfig(max_new_tokens=config.max_new_tokens)
    prompts = corpus_prompts(Side.JUDGE, gate_config.prompts, seed=gate_config.eval_seed)
    assert len(prompts) == gate_config.prompts and not set(prompts) & set(ppo_prompts)
    gate = dict(judge_dir=judge, policy_reward_model_dir=policy_rm, policy_config=config)
    untrained = tmp_path / "untrained"
    load_policy(base_model_dir, config).save_pretrained(untrained)
    ppo_policy = tmp_path / "adapter"
    forward = evaluate_candidate(base_model_dir, ppo_policy, None, prompts, config=gate_config, **gate)
    backward = evaluate_candidate(base_model_dir, untrained, ppo_policy, prompts, config=gate_config, **gate)
    tight_config = dataclasses.replace(gate_config, max_kl=forward.metrics["kl"] / 2)
    tight = evaluate_candidate(base_model_dir, ppo_policy, None, prompts, config=tight_config, **gate)

    # What the users themselves would say: the share of answers to the gate's prompts they like.
    judge_model = RewardModel.load(base_model_dir, judge)

    def liked_share(adapter: Path | None) -> float:
        policy = load_policy(base_model_dir, config, init_adapter=adapter).eval()
        texts = sample_and_score(policy, HFRollout(tokenizer), judge_model, prompts, gate_config).texts
        return sum(map(LENGTH.satisfied, texts)) / len(texts)

    liked = {"base": liked_share(None), "ppo": liked_share(ppo_policy)}

    figures = "\n".join([
        f"long answers (the users' preference): base {liked['base']:.3f}, PPO policy {liked['ppo']:.3f}",
        f"policy RM held-out ranking accuracy {policy_rm_metrics.get('heldout_ranking_accuracy')}, judge's "
        f"{judge_metrics.get('heldout_ranking_accuracy')} (n={judge_metrics.get('heldout_ranking_n')})",
        f"PPO reward per step {[round(m['reward_mean'], 2) for m in history]}, answer length in tokens "
        f"{[round(m['response_length'], 1) for m in history]}",
        f"PPO policy after the base: {forward.metrics}", *forward.reasons,
        f"base after the PPO policy: {backward.metrics}", *backward.reasons,
        f"KL bound {forward.metrics['kl'] / 2:.2f}: {tight.reasons}",
    ])  # fmt: skip
    print(figures)
    m = forward.metrics
    assert liked["ppo"] < liked["base"], figures  # the policy did get worse for the users
    assert m["policy_rm_gain"] > 3 * m["policy_rm_gain_se"], figures  # its own reward model likes it
    assert not forward.passed and m["judge_gain"] < -3 * m["judge_gain_se"], figures  # the judge does not
    checks = ["pass judge", "fail judge gain", "pass kl", "info policy reward model gain"]
    assert [reason.split(":")[0] for reason in forward.reasons] == checks, figures
    # The gate does pass a candidate the judge finds better, and the KL bound alone rejects.
    assert backward.passed and backward.metrics["judge_gain"] > 0, figures
    assert not tight.passed and "fail kl" in tight.reasons[2], figures
