"""The math of PPO with a KL penalty, as pure functions over [batch, response_len] tensors.

Every tensor is aligned on response tokens: position t holds what belongs to the t-th generated token
(its log-probability, the value of the state before it, its reward). `mask` is 1 on real response tokens
(up to and including the end-of-sequence token) and 0 on the padding after them; padding is always on
the right. Masked means weight every real token of the batch equally, as TRL's PPO did.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where(), not x * mask: padding may hold inf or nan (e.g. a log-ratio there) and 0 * inf is nan
    return torch.where(mask.bool(), x, 0.0).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of the real entries."""
    centred = torch.where(mask.bool(), x - masked_mean(x, mask), 0.0)
    return centred.pow(2).sum() / (mask.sum() - 1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the real entries; padding becomes 0."""
    whitened = (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + eps)
    return torch.where(mask.bool(), whitened, 0.0)


def kl_per_token(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's "Approximating KL").

    k1 = log pi - log pi_ref: the InstructGPT penalty term, unbiased but can be negative per token.
    k3 = (r - 1) - log r with r = pi_ref / pi: also unbiased, never negative, lower variance.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def kl_penalized_rewards(
    kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """r_t = -beta * KL_t on every response token, plus the reward model's score on the last one."""
    rewards = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    last = mask.sum(dim=1).long() - 1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores
    return rewards


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016); returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero past
    the last real token (the episode ends there). Returns are A_t + V_t, the value function's targets.
    """
    values = torch.where(mask.bool(), values, 0.0)
    rewards = torch.where(mask.bool(), rewards, 0.0)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    advantages = torch.where(mask.bool(), advantages, 0.0)
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss to minimise; returns (loss, clip fraction).

    The clip fraction counts tokens whose clipped term was the larger (pessimistic) one, i.e. tokens that
    gave no gradient because the ratio had already moved past 1 +- cliprange in the advantage's direction.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * the larger squared error of the new and of the clipped value; returns (loss, clip fraction).

    Clipping keeps the value from moving more than cliprange_value from its rollout-time estimate.
    """
    # clamp(values, ...) rather than old + clamp(values - old, ...): the same in exact arithmetic, but only
    # this form leaves an unclipped value bit-identical, so the clip fraction counts no rounding ties.
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_error = (values - returns).pow(2)
    clipped_error = (clipped_values - returns).pow(2)
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).float(), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over the last dimension."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns]: 1 is a perfect value function, 0 a constant's worth."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask)


class KLController:
    """The KL coefficient beta: fixed (target=None), or adapted towards a target KL per sequence.

    Adaptive rule of Ziegler et al. 2019 ("Fine-tuning language models from human preferences"), as in
    TRL's former AdaptiveKLController: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon,
    where n is the number of rollouts the KL was measured on.
    """

    def __init__(self, init_kl_coef: float, target: float | None = None, horizon: int = 10_000):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
