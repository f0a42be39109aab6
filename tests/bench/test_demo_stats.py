"""The learning benchmark's statistics, in simulation: the preference rate's 95% interval covers the true
rate, and the paired test of two versions has the false-positive rate and power the demo relies on.

Simulated measurement: 100 questions, 2 answers each (the demo's default), question i answered well with
a probability of its own, drawn from Beta(2, 2) (mean 0.5: answers of one question are strongly
correlated). 2,000 simulated measurements per check.
"""

import math
import random

import pytest

from bench.demo_stats import clustered_rate, paired_comparison, proportion, wilson

QUESTIONS, ANSWERS, RUNS = 100, 2, 2000


def measure(rates: list[float], rng: random.Random) -> list[list[bool]]:
    return [[rng.random() < p for _ in range(ANSWERS)] for p in rates]


def question_rates(rng: random.Random, uplift: float = 0.0) -> tuple[list[float], list[float]]:
    base = [rng.betavariate(2, 2) for _ in range(QUESTIONS)]
    return base, [min(1.0, p + uplift) for p in base]


def test_wilson_matches_a_known_interval():
    low, high = wilson(8, 10)  # textbook: 0.490 to 0.943
    assert low == pytest.approx(0.490, abs=1e-3) and high == pytest.approx(0.943, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_proportion_of_independent_outcomes():
    rate = proportion([True] * 30 + [False] * 70)
    assert (rate.value, rate.n) == (0.3, 100) and rate.low < 0.3 < rate.high


def test_clustered_interval_covers_the_true_rate_95_percent_of_the_time():
    # The true rate is the mean of Beta(2, 2), 0.5; the questions are drawn afresh each run.
    rng = random.Random(0)
    covered = naive_covered = 0
    for _ in range(RUNS):
        outcomes = measure(question_rates(rng)[0], rng)
        rate = clustered_rate(outcomes)
        covered += rate.low <= 0.5 <= rate.high
        naive = proportion([y for answers in outcomes for y in answers])
        naive_covered += naive.low <= 0.5 <= naive.high
    assert 0.93 <= covered / RUNS <= 0.97  # measured: 0.944
    assert naive_covered / RUNS < 0.93  # ignoring the clustering the interval is too narrow (measured 0.916)


def test_clustered_rate_at_the_edges():
    assert clustered_rate([[True, True]] * 10).value == 1.0
    assert clustered_rate([[True, True]] * 10).low > 0.8
    assert math.isnan(clustered_rate([]).value)


def test_paired_test_false_positive_rate_and_power():
    """z >= 2 when the new version is as good as the old one (the demo's 'beats v0' criterion requires it):
    at most about 2.3% of runs (one-sided normal tail); with a true uplift of 0.15 (less where a question's
    rate is capped at 1) in 90% of runs."""
    rng = random.Random(1)
    false_positives = detected = 0
    for _ in range(RUNS):
        old_rates, new_rates = question_rates(rng)
        false_positives += paired_comparison(measure(new_rates, rng), measure(old_rates, rng)).z >= 2
        old_rates, new_rates = question_rates(rng, uplift=0.15)
        comparison = paired_comparison(measure(new_rates, rng), measure(old_rates, rng))
        detected += comparison.z >= 2
    assert false_positives / RUNS <= 0.035  # measured: 0.017
    assert detected / RUNS >= 0.85  # measured: 0.90


def test_paired_comparison_uses_matching_questions():
    new = [[True, True], [True, False], []]
    old = [[False, False], [True, False], [True, True]]
    comparison = paired_comparison(new, old)
    assert comparison.questions == 2 and comparison.difference == pytest.approx(0.5)
    with pytest.raises(ValueError):
        paired_comparison(new, old[:2])
