"""PPO's math against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.policy.ppo_losses import (
    KLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalized_rewards,
    kl_per_token,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_by_hand():
    # gamma = 1, lam = 0.95, rewards (0, 0, 1), values (0.5, 0.6, 0.7); V after the last token is 0.
    #   t=2: delta = 1 + 0   - 0.7 = 0.3   A = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1   A = 0.1 + 0.95 * 0.3   = 0.385
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1   A = 0.1 + 0.95 * 0.385 = 0.46575
    # returns = A + V = (0.96575, 0.985, 1.0)
    advantages, returns = compute_gae(t([0, 0, 1]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, t([0.46575, 0.385, 0.3]))
    torch.testing.assert_close(returns, t([0.96575, 0.985, 1.0]))


def test_gae_discounts_and_stops_at_the_padding():
    # Row of 2 real tokens then padding whose reward and value must be ignored; gamma = 0.5, lam = 1.
    #   t=1: delta = 2 + 0.5 * 0 - 1 = 1          A = 1
    #   t=0: delta = 0 + 0.5 * 1 - 1 = -0.5       A = -0.5 + 0.5 * 1 = 0
    advantages, returns = compute_gae(t([0, 2, 9]), t([1, 1, 9]), t([1, 1, 0]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, t([0.0, 1.0, 0.0]))
    torch.testing.assert_close(returns, t([1.0, 2.0, 0.0]))


def test_whiten_uses_only_real_entries():
    # (2, 4, 6): mean 4, unbiased variance (4 + 0 + 4) / 2 = 4, std 2 -> (-1, 0, 1); padding -> 0.
    whitened = whiten(t([2, 4, 6, 100]), t([1, 1, 1, 0]))
    torch.testing.assert_close(whitened, t([-1.0, 0.0, 1.0, 0.0]))


def test_kl_estimators():
    logprobs, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    # k1 = logp - logp_ref = (0.5, -1)
    torch.testing.assert_close(kl_per_token(logprobs, ref, "k1"), t([0.5, -1.0]))
    # k3 = (r - 1) - log r, log r = ref - logp = (-0.5, 1): (e^-0.5 - 1 + 0.5, e - 1 - 1)
    expected = t([math.exp(-0.5) - 0.5, math.e - 2.0])
    torch.testing.assert_close(kl_per_token(logprobs, ref, "k3"), expected)
    assert (kl_per_token(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_per_token(logprobs, ref, "k2")


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    # beta = 0.1: rewards = -0.1 * KL, plus the score on the last real token of each row.
    kl = t([0.5, -1.0, 0.2], [1.0, 1.0, 1.0])
    mask = t([1, 1, 0], [1, 1, 1])
    rewards = kl_penalized_rewards(kl, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, t([-0.05, 0.1 + 2.0, 0.0], [-0.1, -0.1, -0.1 - 1.0]))


def test_clipped_surrogate_inside_and_outside_the_clip_range():
    # cliprange 0.2; loss per token = max(-A * ratio, -A * clip(ratio, 0.8, 1.2)):
    #   A=+1, ratio 1.1 (inside):              max(-1.1, -1.1) = -1.1   unclipped
    #   A=+1, ratio 1.5 (above, same way as A): max(-1.5, -1.2) = -1.2   clipped
    #   A=-1, ratio 0.9 (inside):              max( 0.9,  0.9) =  0.9   unclipped
    #   A=-1, ratio 0.5 (below, same way as A): max( 0.5,  0.8) =  0.8   clipped
    #   A=+1, ratio 0.5 (below, against A):     max(-0.5, -0.8) = -0.5   unclipped: still pushed up
    #   padding (ratio e^5) must not count
    # loss = (-1.1 - 1.2 + 0.9 + 0.8 - 0.5) / 5 = -0.22, clip fraction 2 / 5
    ratios = t([1.1, 1.5, 0.9, 0.5, 0.5, math.exp(5.0)])
    advantages = t([1, 1, -1, -1, 1, 1])
    mask = t([1, 1, 1, 1, 1, 0])
    old = torch.zeros(6)
    loss, clipfrac = policy_loss(torch.log(ratios), old, advantages, mask, cliprange=0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.22))
    torch.testing.assert_close(clipfrac, torch.tensor(0.4))


def test_clipped_surrogate_gradient_vanishes_where_clipped():
    logprobs = torch.log(t([1.1, 1.5])).requires_grad_()
    loss, _ = policy_loss(logprobs, torch.zeros(2), t([1, 1]), t([1, 1]), cliprange=0.2)
    loss.backward()
    # d/dlogp of -A * ratio / n = -ratio / 2 = -0.55 for the unclipped token; 0 for the clipped one
    torch.testing.assert_close(logprobs.grad, t([-0.55, 0.0]))


def test_clipped_value_loss():
    # cliprange_value 0.2, old value 0.5, return 1; loss per token = max((v - R)^2, (v_clip - R)^2):
    #   v = 1.0 -> v_clip 0.7: max(0, 0.09)    = 0.09  clipped
    #   v = 0.6 -> v_clip 0.6: max(0.16, 0.16) = 0.16  unclipped
    #   v = 0.0 -> v_clip 0.3: max(1, 0.49)    = 1     unclipped
    # loss = 0.5 * (0.09 + 0.16 + 1) / 3 = 0.208333, clip fraction 1 / 3
    values = t([1.0, 0.6, 0.0, 50.0])
    mask = t([1, 1, 1, 0])
    loss, clipfrac = value_loss(values, torch.full((4,), 0.5), torch.ones(4), mask, cliprange_value=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 1.25 / 3))
    torch.testing.assert_close(clipfrac, torch.tensor(1 / 3))


def test_masked_mean_ignores_inf_in_padding():
    assert masked_mean(t([1.0, 3.0, math.inf]), t([1, 1, 0])).item() == 2.0


def test_entropy_and_explained_variance():
    # uniform over 4 -> log 4; a one-hot-like distribution -> ~0
    torch.testing.assert_close(entropy_from_logits(torch.zeros(4)), torch.tensor(math.log(4)))
    assert entropy_from_logits(t([100.0, 0.0, 0.0])).item() < 1e-6
    # returns (1, 2, 3): var 1; values (1, 2, 2): residuals (0, 0, 1), var 1/3 -> 1 - 1/3
    ev = explained_variance(t([1, 2, 2]), t([1, 2, 3]), t([1, 1, 1]))
    torch.testing.assert_close(ev, torch.tensor(2 / 3))


def test_adaptive_kl_controller():
    # error = clip(12 / 6 - 1, -0.2, 0.2) = 0.2; beta *= 1 + 0.2 * 1000 / 10000 = 1.02
    controller = KLController(0.1, target=6.0, horizon=10_000)
    controller.update(12.0, n_steps=1000)
    assert controller.value == pytest.approx(0.102)
    # error = 3 / 6 - 1 = -0.5, clipped to -0.2; beta *= 1 - 0.2 * 1000 / 10000 = 0.98
    controller.update(3.0, n_steps=1000)
    assert controller.value == pytest.approx(0.102 * 0.98)
    fixed = KLController(0.1)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.1


def test_value_clip_fraction_counts_no_rounding_ties():
    # Values within the clip range of their old estimates are not clipped, whatever rounding does: near
    # zero, old + (values - old) is not always bit-identical to values in float32 (~1% of these were).
    generator = torch.Generator().manual_seed(0)
    old_values = 0.01 * torch.randn(1000, generator=generator)
    values = 0.01 * torch.randn(1000, generator=generator)
    returns = torch.randn(1000, generator=generator)
    _, clipfrac = value_loss(values, old_values, returns, torch.ones(1000), cliprange_value=0.2)
    assert clipfrac.item() == 0.0
