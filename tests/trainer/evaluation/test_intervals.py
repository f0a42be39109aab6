"""The Wilson interval: by hand, at the edges, and its coverage computed exactly over the binomial."""

from __future__ import annotations

import math

import pytest

from trainer.evaluation.intervals import wilson_interval


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.192) / 1.384 = 0.7168, half-width 1.96 / 1.384 * sqrt(0.016 +
    # 0.0096) = 0.2266.
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # It stays inside [0, 1] and is not empty at 0 or n successes.
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


@pytest.mark.parametrize("n", [20, 50, 100, 300])
@pytest.mark.parametrize("p", [0.5, 0.7, 0.8, 0.9, 0.95])
def test_wilson_interval_covers_the_true_accuracy_about_95_percent_of_the_time(n, p):
    # Exactly, over every outcome of n trials: computed 0.92-0.98 for these n and p (the coverage of a
    # discrete test oscillates around its nominal rate); the naive p +- 1.96 se gives 0.88 at n = 20, p = 0.9.
    coverage = sum(
        math.comb(n, k) * p**k * (1 - p) ** (n - k)
        for k in range(n + 1)
        if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1]
    )
    assert 0.92 <= coverage <= 0.98, coverage
