"""Confidence intervals of proportions (accuracies, rates) measured on small samples."""

from __future__ import annotations

import math

Z_95 = 1.959964  # the standard normal's 97.5th percentile: two-sided 95%


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for the default z).

    Unlike p +- z * se it stays inside [0, 1], is not empty at 0 or n successes, and covers close to its
    nominal rate at small n (Brown, Cai and DasGupta 2001). It assumes independent trials.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    shrink = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half_width = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)
