"""The canary's two tests, on one kind of evidence at a time (approval rates, or direct comparisons).

- Rollback, weighed every second: a mixture sequential probability ratio test (mSPRT; Johari et al.,
  "Always valid inference", 2017). Under "no difference" its likelihood ratio Lambda exceeds 1/alpha with
  probability at most alpha however often it is looked at. For an estimated difference `d` whose variance
  under "no difference" is V, mixing the alternative over differences N(0, tau^2):

      log Lambda = 1/2 log(V / (V + tau^2)) + d^2 tau^2 / (2 V (V + tau^2))

  It is computed and compared in log space, so no count of observations can overflow it.
- Promotion, once: a one-sided non-inferiority test. The canary is promoted only if the lower confidence
  bound of (canary - baseline) at level 1 - alpha is above -margin, i.e. the evidence excludes "worse by
  more than the margin". Its estimate adds one approval and one disapproval to each arm (Agresti & Caffo,
  2000), which keeps the bound honest at small counts and rates near 0 or 1. The test is taken once, when
  the difference is measured precisely enough: when its standard error is at most
  margin / (z(1 - alpha) + z(power)), the test excludes "worse by the margin" for an equal canary with
  probability `power`.
- Early promotion, weighed every second: a canary clearly better (or clearly not worse) need not wait for
  that precision. It is promoted as soon as the always-valid lower bound of one kind of evidence (the
  confidence sequence of the same mixture) is above -margin and no kind's estimate is below -margin.
  Being valid under continuous monitoring, this route adds at most alpha to the chance of promoting a
  canary worse by the margin (simulated: tests/serving/test_canary.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist


@dataclass(frozen=True)
class Comparison:
    """One kind of evidence reduced to what the tests need: canary against baseline, or share against 1/2."""

    difference: float  # the plain estimate: canary's approval rate - baseline's, or canary's share - 1/2
    null_variance: float  # the estimate's variance if canary and baseline were alike
    adjusted_difference: float  # the Agresti-Caffo estimate the confidence bound is built on
    standard_error: float  # of the adjusted estimate
    observations: int  # of the arm with fewer (for comparisons: all of them)

    def log_likelihood_ratio(self, tau: float) -> float:
        """mSPRT: log Lambda of "the difference is not 0" (mixed over N(0, tau^2)) against "it is 0"."""
        if self.null_variance == 0:  # every observation the same: no evidence of a difference
            return 0.0
        mixed = self.null_variance + tau**2
        return (0.5 * math.log(self.null_variance / mixed)
                + self.difference**2 * tau**2 / (2 * self.null_variance * mixed))

    def always_valid_lower_bound(self, alpha: float, tau: float) -> float:
        """Lower end of the mixture confidence sequence (the mSPRT inverted, Howard et al. 2021): it holds
        at level 1 - alpha at every look at once, so it may be weighed every second. Its radius, with V
        the estimate's variance: sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))."""
        variance = self.standard_error**2
        mixed = variance + tau**2
        radius = math.sqrt(variance * mixed / tau**2 * (2 * math.log(1 / alpha) + math.log(mixed / variance)))
        return self.adjusted_difference - radius

    def lower_bound(self, alpha: float) -> float:
        """One-sided lower confidence bound of the difference at level 1 - alpha."""
        return self.adjusted_difference - NormalDist().inv_cdf(1 - alpha) * self.standard_error


def approval_comparison(canary_approvals: int, canary_ratings: int, baseline_approvals: int,
                        baseline_ratings: int) -> Comparison:
    """Canary's approval rate against the baseline's (both arms need at least one rating)."""
    difference = canary_approvals / canary_ratings - baseline_approvals / baseline_ratings
    pooled = (canary_approvals + baseline_approvals) / (canary_ratings + baseline_ratings)
    null_variance = pooled * (1 - pooled) * (1 / canary_ratings + 1 / baseline_ratings)
    canary = (canary_approvals + 1) / (canary_ratings + 2)
    baseline = (baseline_approvals + 1) / (baseline_ratings + 2)
    standard_error = math.sqrt(canary * (1 - canary) / (canary_ratings + 2)
                               + baseline * (1 - baseline) / (baseline_ratings + 2))
    return Comparison(difference, null_variance, canary - baseline, standard_error,
                      min(canary_ratings, baseline_ratings))


def preference_comparison(canary_wins: int, comparisons: int) -> Comparison:
    """Canary's share of the direct comparisons against 1/2 (at least one comparison)."""
    share = (canary_wins + 1) / (comparisons + 2)
    return Comparison(canary_wins / comparisons - 0.5, 0.25 / comparisons, share - 0.5,
                      math.sqrt(share * (1 - share) / (comparisons + 2)), comparisons)


@cache  # weighed every second with the same configuration
def planned_standard_error(margin: float, alpha: float, power: float) -> float:
    """The standard error at which a one-sided test at level alpha excludes "worse by `margin`" with
    probability `power` when there is no difference."""
    z = NormalDist().inv_cdf
    return margin / (z(1 - alpha) + z(power))
