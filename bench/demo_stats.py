"""The learning benchmark's statistics: rates with 95% intervals, and paired comparisons of two versions.

Answers to one question are correlated (a policy that answers a question well tends to for every sample),
so a version's preference rate is measured over questions, several answers each: its interval is a
Wilson interval on the effective sample size (answers divided by the design effect of the clustering by
question, estimated from the data), and two versions measured on the same questions are compared by a
paired z-test over questions. tests/bench/test_demo_stats.py checks the coverage, the false-positive rate
and the power in simulation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

Z_95 = 1.959964


@dataclass(frozen=True)
class Rate:
    value: float
    low: float  # 95% interval
    high: float
    n: int  # answers (or ratings) it is measured on

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def wilson(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(outcomes: Sequence[bool]) -> Rate:
    """A rate of independent yes/no outcomes (e.g. thumbs up among thumbs), with its Wilson interval."""
    n = len(outcomes)
    successes = sum(outcomes)
    low, high = wilson(successes, n)
    return Rate(successes / n if n else float("nan"), low, high, n)


def clustered_rate(outcomes_by_question: Sequence[Sequence[bool]]) -> Rate:
    """The rate over all answers, with a Wilson interval on the effective sample size: the answers divided
    by the design effect (cluster-robust variance by question over the variance of independent answers)."""
    clusters = [list(map(float, answers)) for answers in outcomes_by_question if answers]
    n = sum(len(c) for c in clusters)
    if n == 0:
        return Rate(float("nan"), 0.0, 1.0, 0)
    p = sum(map(sum, clusters)) / n
    g = len(clusters)
    design_effect = 1.0
    if 0 < p < 1 and g > 1:
        clustered_var = g / (g - 1) * sum(sum(y - p for y in c) ** 2 for c in clusters) / n**2
        design_effect = max(clustered_var / (p * (1 - p) / n), 1e-9)
    low, high = wilson(p * n / design_effect, n / design_effect)
    return Rate(p, low, high, n)


@dataclass(frozen=True)
class Comparison:
    difference: float  # new rate minus old rate, over the questions both were measured on
    z: float  # paired z over questions: mean difference / its standard error
    questions: int


def paired_comparison(new: Sequence[Sequence[bool]], old: Sequence[Sequence[bool]]) -> Comparison:
    """Two versions measured on the same questions (index i is question i in both): the difference of
    their rates and a z over the per-question differences. z is +-inf when every question moved alike."""
    differences = [statistics.fmean(a) - statistics.fmean(b) for a, b in zip(new, old, strict=True) if a and b]
    if not differences:
        return Comparison(float("nan"), float("nan"), 0)
    mean = statistics.fmean(differences)
    se = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else 0.0
    z = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
    return Comparison(mean, z, len(differences))
