"""The evaluation gate: before a round publishes its policy, an independent judge must not find it worse.

PPO optimises the policy's reward model, so that model's score of the new policy is biased upwards: a
policy that learned to exploit it (reward hacking) shows a "gain". The gate therefore asks another
reward model, the judge, trained only on the judge side of the data split (trainer.data.split), which PPO
never optimised against, and asks it only about judge-side prompts, which PPO never trained on.

The test. The candidate and its parent answer the same P prompts, S answers each, with the same per-prompt
seeds (paired samples: where the policies agree their answers agree). The judge scores every answer; d_p is
the mean over prompt p's answers of (candidate - parent). The gain is the mean of d_p and its standard
error is std(d_p) / sqrt(P): clustered by prompt, because answers to one prompt share the prompt's effect
and are not independent (treating the P*S differences as independent understates the s.e.;
tests/trainer/evaluation/test_gate.py checks both in simulation: the naive s.e. under-covers, the clustered
one covers about 95%). The gate rejects when

  1. the judge is not validated: its held-out ranking accuracy (trainer.data.split's held-out side, which
     neither reward model trains on) has a Wilson 95% lower bound <= `min_judge_accuracy` (0.5), or there
     are too few held-out comparisons to tell (the reward model's `min_heldout`). An unvalidated judge is
     a reject, not a pass on KL alone: its verdict would be noise, and the policy's own reward model is
     exactly what cannot be trusted here. The first rounds publish once enough held-out comparisons exist;
  2. the candidate is measurably worse: gain < -max_reward_drop_se * s.e. With P = 64 prompts (S = 4, 256
     answers per policy) a candidate equal to its parent is rejected with probability Phi(-3) = 0.13%
     under the normal approximation (0.19% under Student's t with 63 degrees of freedom), and one worse by
     delta with probability Phi(delta / s.e. - 3): 50% at 3 s.e., 84% at 4;
  3. its KL to the reference exceeds `max_kl` nats per answer (measured on its own answers): the policy
     left the region the reward models can judge.

The policy reward model's gain on the same answers is reported beside the judge's, for contrast: reward
hacking shows as a policy-RM gain without a judge gain. A rejected round publishes nothing; its reward
models are kept for the next round, which starts again from the parent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from trainer.data import Prompt
from trainer.policy.ppo import PPOConfig, load_policy, pack, policy_forward, reference_policy
from trainer.policy.rollout import HFRollout, RolloutBackend, ended
from trainer.reward.reward_model import META_FILE, RewardModel
from trainer.tokens import load_tokenizer, prompt_ids


@dataclass
class EvalConfig:
    # Prompts the gate asks, all on the judge side of the split (trainer.data.prompts.gate_prompts): up to
    # `user_prompts` of the users' most recent judge-side prompts, then corpus prompts drawn with
    # `eval_seed` (the same every round, so rounds compare; PPO draws with the trainer's seed), up to
    # `prompts` in all.
    prompts: int = 64
    user_prompts: int = 32
    eval_seed: int = 1_000_003
    # Answers per prompt, their length cap and temperature (PPO's sampling, so the KL is the trained one;
    # the loop passes the round's PPO settings). Measured on the tiny model: with 96 answers, the standard
    # error of the paired reward difference between a PPO policy and its parent was 0.35 against a gain of
    # 0.87; 256 answers halve it.
    samples_per_prompt: int = 4
    max_new_tokens: int = PPOConfig.max_new_tokens
    temperature: float = PPOConfig.temperature
    # Reject if the judge's mean reward of the candidate is below the parent's by more than this many
    # clustered standard errors. 3 rejects a candidate no worse than its parent 0.13% of the time.
    max_reward_drop_se: float = 3.0
    # Reject if the candidate's KL to the reference exceeds this, in nats per answer: the bound the
    # learning tests hold PPO to (tests/trainer/policy/test_ppo.py, KL_BOUND), so what ships is what is
    # tested.
    max_kl: float = 10.0
    # Reject unless the Wilson 95% lower bound of the judge's held-out ranking accuracy exceeds this.
    min_judge_accuracy: float = 0.5
    # False lets an unvalidated judge (too little held-out feedback, or no better than chance) decide
    # anyway. Only for plumbing tests and demos of the wiring: such a judge's verdict is noise.
    require_validated_judge: bool = True


@dataclass(frozen=True)
class PolicySamples:
    texts: list[str]
    ended: list[bool]  # False: the answer was cut at max_new_tokens
    rewards: torch.Tensor  # [prompts * samples], prompt-major
    kl: float  # to the reference, nats per answer (mean over answers of sum of log pi - log pi_ref)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str]  # one line per check, "pass ...", "fail ..." or "info ...", with its figures
    metrics: dict[str, float]


def sample_and_score(
    policy: PeftModel,
    rollout: RolloutBackend,
    reward_model: RewardModel,
    prompts: list[Prompt],
    config: EvalConfig,
) -> PolicySamples:
    """Answers of `policy` to `prompts` (the same seeds every call), their rewards and KL."""
    tokenizer = reward_model.tokenizer
    queries = [prompt_ids(tokenizer, p) for p in prompts]
    n = config.samples_per_prompt
    rollout.refresh(policy)
    responses = rollout.generate(queries, n, config.max_new_tokens, config.temperature,
                                 seeds=list(range(len(queries))))  # fmt: skip
    batch = pack([q for q in queries for _ in range(n)], responses, tokenizer.pad_token_id).to(policy.device)
    head = torch.nn.Linear(policy.config.hidden_size, 1, device=policy.device)  # values are not needed here
    with torch.no_grad():
        logprobs = policy_forward(policy, head, batch, config.temperature)[0]
        with reference_policy(policy):
            ref_logprobs = policy_forward(policy, head, batch, config.temperature)[0]
    kl = torch.where(batch.response_mask.bool(), logprobs - ref_logprobs, 0.0).sum(dim=1).mean().item()
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    finished = [ended(r, rollout.stop_ids) for r in responses]
    return PolicySamples(texts, finished, rescore(reward_model, prompts, texts, finished), kl)


def rescore(
    reward_model: RewardModel, prompts: list[Prompt], texts: list[str], finished: list[bool]
) -> torch.Tensor:
    """`reward_model`'s scores of prompt-major answers, len(texts) // len(prompts) to a prompt."""
    n = len(texts) // len(prompts)
    return reward_model.score([p for p in prompts for _ in range(n)], texts, ended=finished).cpu()


def clustered_gain(
    candidate: torch.Tensor, parent: torch.Tensor, samples_per_prompt: int
) -> tuple[float, float]:
    """Mean paired difference and its standard error clustered by prompt (see the module docstring).

    `candidate` and `parent` are prompt-major rewards, `samples_per_prompt` answers to a prompt.
    """
    per_prompt = (candidate - parent).double().view(-1, samples_per_prompt).mean(dim=1)
    if len(per_prompt) < 2:
        raise ValueError("a clustered standard error needs at least two prompts")
    return per_prompt.mean().item(), (per_prompt.std() / math.sqrt(len(per_prompt))).item()


def judge_check(judge_metrics: Mapping[str, float], config: EvalConfig) -> tuple[bool, str]:
    """Whether the judge is validated on held-out feedback, and the reason line saying so. It is judged on
    held-out ranking accuracy: users' pairwise choices plus liked/disliked answers to one prompt
    (trainer.reward.reward_model.heldout_metrics), so thumbs and ratings validate it too."""
    n = int(judge_metrics.get("heldout_ranking_n", 0))
    low = judge_metrics.get("heldout_ranking_low")
    if low is None:
        problem = f"{n} held-out comparisons, too few to validate it"
    else:
        accuracy, high = judge_metrics["heldout_ranking_accuracy"], judge_metrics["heldout_ranking_high"]
        figures = f"held-out ranking accuracy {accuracy:.2f} (95% {low:.2f}-{high:.2f}, n={n})"
        if low > config.min_judge_accuracy:
            return True, f"pass judge: {figures}"
        problem = f"{figures}, lower bound not above {config.min_judge_accuracy}"
    if not config.require_validated_judge:
        return True, f"info judge: {problem}; not required (TRAINER_EVAL_REQUIRE_VALIDATED_JUDGE=false)"
    return False, f"fail judge: {problem}"


def reward_model_metrics(reward_model_dir: Path) -> dict[str, float]:
    """The metrics a reward model was saved with (its held-out accuracy among them)."""
    return json.loads((Path(reward_model_dir) / META_FILE).read_text())["metrics"]


def evaluate_candidate(
    base_model: Path,
    candidate_adapter: Path,
    parent_adapter: Path | None,
    prompts: list[Prompt],
    *,
    judge_dir: Path,
    policy_reward_model_dir: Path,
    config: EvalConfig,
    policy_config: PPOConfig,
    reference_adapter: Path | None = None,
    rollout: RolloutBackend | None = None,
) -> GateResult:
    """The gate's verdict on `candidate_adapter` against its parent (None: the base model, or the SFT
    policy when `reference_adapter` is given, as PPO starts from it), asking judge-side `prompts`."""
    validated, judge_reason = judge_check(reward_model_metrics(judge_dir), config)
    if not validated:
        return GateResult(False, [judge_reason], {"passed": 0.0})
    base_model = Path(base_model)
    judge = RewardModel.load(base_model, Path(judge_dir))
    rollout = rollout or HFRollout(load_tokenizer(base_model))

    def samples(adapter: Path | None) -> PolicySamples:
        policy = load_policy(base_model, policy_config, adapter, reference_adapter).eval()
        return sample_and_score(policy, rollout, judge, prompts, config)

    candidate, parent = samples(candidate_adapter), samples(parent_adapter)
    n = config.samples_per_prompt
    gain, gain_se = clustered_gain(candidate.rewards, parent.rewards, n)
    policy_rm = RewardModel.load(base_model, Path(policy_reward_model_dir))
    policy_rm_gain, policy_rm_gain_se = clustered_gain(
        rescore(policy_rm, prompts, candidate.texts, candidate.ended),
        rescore(policy_rm, prompts, parent.texts, parent.ended),
        n,
    )

    floor = -config.max_reward_drop_se * gain_se
    regressed = gain < floor
    too_far = candidate.kl > config.max_kl
    sample = f"{len(prompts)} prompts x {n} answers"
    reasons = [
        judge_reason,
        f"{'fail' if regressed else 'pass'} judge gain: {gain:+.3f}, clustered s.e. {gain_se:.3f} over"
        f" {sample}; rejects below {floor:+.3f} ({config.max_reward_drop_se:g} s.e.)",
        f"{'fail' if too_far else 'pass'} kl: {candidate.kl:.2f} nats per answer to the reference,"
        f" bound {config.max_kl:g}",
        f"info policy reward model gain: {policy_rm_gain:+.3f}, s.e. {policy_rm_gain_se:.3f} (PPO optimised"
        f" it: a gain here without one from the judge is reward hacking)",
    ]
    metrics = {
        "judge_reward": candidate.rewards.mean().item(),
        "judge_parent_reward": parent.rewards.mean().item(),
        "judge_gain": gain,
        "judge_gain_se": gain_se,
        "policy_rm_gain": policy_rm_gain,
        "policy_rm_gain_se": policy_rm_gain_se,
        "kl": candidate.kl,
        "parent_kl": parent.kl,
        "prompts": float(len(prompts)),
        "passed": float(not regressed and not too_far),
    }
    return GateResult(not regressed and not too_far, reasons, metrics)
