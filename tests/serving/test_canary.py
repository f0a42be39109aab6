"""The canary: its statistics by hand, what counts as evidence (once per answer and user, whichever replica
served it; nothing pinned nor older than the trial), its operating characteristics in simulation, then
through the app on the fake engine (share, rollback on bad ratings and on failures, promotion, operator
verdicts, verdicts surviving a restart, the first verdict final)."""

from __future__ import annotations

import math
import random
import statistics
import sys
import uuid
from collections import Counter

import pytest
from fastapi.testclient import TestClient

from common.registry import BASE_POLICY, PROMOTED, ROLLED_BACK, PolicyRegistry, PolicyVersion
from feedback import parse_feedback, referenced_choices
from serving.app import build_app
from serving.canary import CanaryConfig, CanaryTrial
from serving.canary_evidence import ArmStats, HeadToHead, approval
from serving.canary_stats import approval_comparison, planned_standard_error, preference_comparison
from serving.completion_ids import CompletionIds
from serving.settings import ServingSettings
from tests.serving.test_policy import publish_fake_adapter

USER = [{"role": "user", "content": "Hello"}]
CANARY_V1 = PolicyVersion(number=1, path=None, manifest={"version": "v1"})
IDS = CompletionIds("k" * 32)  # every replica's key
ROLLBACK_THRESHOLD = math.log(2 / 0.01)  # mSPRT at the default alpha 1%, halved between its two tests


def trial(**config) -> CanaryTrial:
    defaults = dict(fraction=0.5, min_requests=20, min_seconds=0, min_ratings=10, max_seconds=3600)
    return CanaryTrial(baseline=BASE_POLICY, canary=CANARY_V1, config=CanaryConfig(**{**defaults, **config}))


def serve(t: CanaryTrial, *versions: str, failed: bool = False, routed: bool = True,
          issued_at: int | None = None) -> str:
    """A request to the trial's replica, one choice per version (counted there when routed); its signed id."""
    if routed:
        t.observe_request(list(versions), failed)
    return IDS.issue(list(versions), issued_at=issued_at, routed=routed)


def tell(t: CanaryTrial, feedback, user_hash: str | None = None) -> None:
    """Feedback as the intake passes it on, with what the verified ids say of the answers it names."""
    answers = [IDS.verify(ref.completion_id).answer(ref.choice_index) for ref in referenced_choices(feedback)]
    t.observe_feedback(feedback, user_hash, answers)


def thumbs_on(completion_id: str, up: bool, choice_index: int = 0):
    return parse_feedback({"type": "thumbs", "rating": "up" if up else "down", "completion_id": completion_id,
                           "choice_index": choice_index})


def pairwise(completion_id: str, preference: str):
    return parse_feedback({"type": "pairwise", "preference": preference,
                           "a": {"completion_id": completion_id, "choice_index": 0},
                           "b": {"completion_id": completion_id, "choice_index": 1}})


def feed(t: CanaryTrial, version: str, requests: int = 0, failures: int = 0, ups: int = 0, downs: int = 0):
    """`requests` unrated requests (the first `failures` of them failed), then one rated request per vote."""
    for i in range(requests):
        serve(t, version, failed=i < failures)
    for up in [True] * ups + [False] * downs:
        tell(t, thumbs_on(serve(t, version), up))


def choose(t: CanaryTrial, canary_wins: int, baseline_wins: int) -> None:
    """A/B answers (baseline first) and users' choices between them."""
    for canary_won in [True] * canary_wins + [False] * baseline_wins:
        tell(t, pairwise(serve(t, "v0", "v1"), "b" if canary_won else "a"))


# --- The statistics by hand -----------------------------------------------------------------------


def test_approval_of_each_kind_of_feedback():
    ref = {"completion_id": "c"}
    assert approval(parse_feedback({"type": "thumbs", "rating": "up", **ref})) is True
    assert approval(parse_feedback({"type": "thumbs", "rating": "down", **ref})) is False
    assert [approval(parse_feedback({"type": "rating", "score": s, **ref})) for s in range(1, 8)] == [
        False, False, False, None, True, True, True]
    assert approval(parse_feedback({"type": "correction", "text": "better", **ref})) is None


def test_mixture_likelihood_ratio_by_hand_in_log_space():
    # 10/40 against 30/40: pooled p = 0.5, V = 0.25 * (1/40 + 1/40) = 0.0125, diff = -0.5, tau^2 = 0.04:
    # log Lambda = 0.5 * log(0.0125 / 0.0525) + 0.25 * 0.04 / (2 * 0.0125 * 0.0525) = -0.71755 + 7.61905.
    worse = approval_comparison(10, 40, 30, 40)
    assert worse.difference == -0.5 and worse.log_likelihood_ratio(0.2) == pytest.approx(6.90150, abs=1e-5)
    # Equal rates: log Lambda = 0.5 * log(V / (V + tau^2)) < 0, evidence for "no difference".
    equal = approval_comparison(18, 20, 36, 40)  # pooled p = 0.9, V = 0.09 * (1/20 + 1/40) = 0.00675
    assert equal.log_likelihood_ratio(0.2) == pytest.approx(0.5 * math.log(0.00675 / 0.04675), abs=1e-12)
    # All approve on both sides: no variance, no evidence.
    assert approval_comparison(5, 5, 9, 9).log_likelihood_ratio(0.2) == 0
    # 10 wins of 40: diff = -0.25, V = 0.25 / 40 = 0.00625: 0.5 * log(0.00625 / 0.04625) + 4.32432 = 3.32358.
    assert preference_comparison(10, 40).log_likelihood_ratio(0.2) == pytest.approx(3.32358, abs=1e-5)


def test_non_inferiority_bound_by_hand():
    # 150/200 against 1400/2000, one approval and one disapproval added to each arm (Agresti-Caffo):
    # 151/202 = 0.747525 and 1401/2002 = 0.699800, difference 0.047725, standard error
    # sqrt(0.747525 * 0.252475 / 202 + 0.699800 * 0.300200 / 2002) = 0.032237; bound 0.047725 - 1.644854 se.
    bound = approval_comparison(150, 200, 1400, 2000).lower_bound(0.05)
    assert bound == pytest.approx(-0.005301, abs=1e-6)
    # 360 wins of 719 comparisons: (361/721) - 0.5 = 0.000693, se sqrt(0.500693 * 0.499307 / 721) = 0.018621.
    assert preference_comparison(360, 719).lower_bound(0.05) == pytest.approx(0.000693 - 1.644854 * 0.018621,
                                                                                abs=1e-6)
    # The precision the test waits for: margin / (z(0.95) + z(0.85)) = 0.1 / (1.644854 + 1.036433).
    assert planned_standard_error(0.1, 0.05, 0.85) == pytest.approx(0.037295, abs=1e-6)


def test_no_overflow_at_a_million_comparisons():
    # The likelihood ratio itself would be far beyond a float (exp(19994)); the test compares logs.
    assert preference_comparison(400_000, 10**6).log_likelihood_ratio(0.2) > math.log(sys.float_info.max)
    worse = trial(min_requests=10**9)
    worse.evidence.head_to_head = HeadToHead(comparisons=10**6, canary_wins=400_000)
    worse.evidence.arms["canary"].ratings, worse.evidence.arms["canary"].approvals = 10**6, 400_000
    worse.evidence.arms["baseline"].ratings, worse.evidence.arms["baseline"].approvals = 10**6, 700_000
    assert worse.verdict().verdict == ROLLED_BACK
    equal = trial(min_requests=10**9)
    for n in range(10**6 - 3, 10**6 + 1):  # weighed again and again, as serving does every second
        equal.evidence.head_to_head = HeadToHead(comparisons=n, canary_wins=n // 2)
        assert equal.verdict() is None


# --- What counts as evidence ----------------------------------------------------------------------


def test_latest_rating_per_answer_and_user_wins():
    t = trial()
    answer = serve(t, "v1")
    for up in (True, True, False, True, False):  # one anonymous voter changing their mind
        tell(t, thumbs_on(answer, up))
    assert t.evidence.arms["canary"] == ArmStats(requests=1, ratings=1, approvals=0)
    for user, up in (("alice", True), ("bob", True), ("alice", True), ("bob", False)):
        tell(t, thumbs_on(answer, up), user_hash=user)
    assert t.evidence.arms["canary"] == ArmStats(requests=1, ratings=3, approvals=1)  # anonymous, alice, bob
    neutral = parse_feedback({"type": "rating", "score": 4, "completion_id": answer})
    tell(t, neutral, user_hash="alice")  # a 4 withdraws alice's vote
    tell(t, parse_feedback({"type": "rating", "score": 6, "completion_id": answer}), user_hash="bob")
    assert t.evidence.arms["canary"] == ArmStats(requests=1, ratings=2, approvals=1)
    # A second choice of the same completion is another answer.
    two = serve(t, "v1", "v1")
    tell(t, thumbs_on(two, True, choice_index=0))
    tell(t, thumbs_on(two, True, choice_index=1))
    assert t.evidence.arms["canary"].ratings == 4


def test_one_choice_per_pair_of_answers_and_user():
    t = trial(min_requests=1000)
    ab = serve(t, "v0", "v1")
    for preference in "abba":
        tell(t, pairwise(ab, preference))
    assert t.evidence.head_to_head == HeadToHead(comparisons=1, canary_wins=0)  # the latest, "a": baseline
    tell(t, pairwise(ab, "b"), user_hash="alice")
    assert t.evidence.head_to_head == HeadToHead(comparisons=2, canary_wins=1)
    tell(t, pairwise(ab, "tie"), user_hash="alice")  # a tie withdraws alice's choice
    assert t.evidence.head_to_head == HeadToHead(comparisons=1, canary_wins=0)
    # The same pair named the other way round is the same pair.
    swapped = parse_feedback({"type": "pairwise", "preference": "a", "a": {"completion_id": ab, "choice_index": 1},
                              "b": {"completion_id": ab, "choice_index": 0}})
    tell(t, swapped)
    assert t.evidence.head_to_head == HeadToHead(comparisons=1, canary_wins=1)
    # Two answers of one version, and rankings, are no comparison of the canary.
    tell(t, pairwise(serve(t, "v1", "v1"), "a"))
    tell(t, parse_feedback({"type": "ranking", "ranked": [{"completion_id": ab, "choice_index": 1},
                                                                     {"completion_id": ab}]}))
    assert t.evidence.head_to_head == HeadToHead(comparisons=1, canary_wins=1)


def test_feedback_on_answers_another_replica_routed_counts():
    """Each replica runs its own trial of the same two versions; feedback lands on whichever replica the load
    balancer picks. Requests and failures stay with the replica that served them."""
    here, there = trial(), trial()
    rated, compared = serve(there, "v1"), serve(there, "v0", "v1")
    tell(here, thumbs_on(rated, True), user_hash="alice")
    tell(here, pairwise(compared, "b"), user_hash="alice")
    assert here.evidence.arms["canary"] == ArmStats(ratings=1, approvals=1)
    assert here.evidence.head_to_head == HeadToHead(comparisons=1, canary_wins=1)
    assert there.evidence.arms["canary"] == ArmStats(requests=2) and there.evidence.head_to_head == HeadToHead()
    tell(here, thumbs_on(rated, False), user_hash="alice")  # alice changes her mind: her latest vote counts
    assert here.evidence.arms["canary"] == ArmStats(ratings=1, approvals=0)


def test_pinned_operators_and_earlier_answers_are_no_evidence():
    t = trial()
    start = int(t.started_wall)
    pinned = serve(t, "v0", "v1", routed=False)  # pinned to a version, or an operator's: its id says so
    earlier = serve(t, "v0", "v1", issued_at=start - 1)  # routed, but before the trial started
    for answer in (pinned, earlier):
        for choice_index in (0, 1):
            tell(t, thumbs_on(answer, False, choice_index))
        tell(t, pairwise(answer, "a"))
    now = serve(t, "v1")  # one side of a pair fit, the other not: no comparison
    across = parse_feedback({"type": "pairwise", "preference": "b", "a": {"completion_id": earlier},
                             "b": {"completion_id": now}})
    tell(t, across)
    tell(t, thumbs_on(serve(t, "v7"), False))  # another version's answer
    assert [(arm.ratings, arm.approvals) for arm in t.evidence.arms.values()] == [(0, 0), (0, 0)]
    assert t.evidence.head_to_head == HeadToHead()
    tell(t, thumbs_on(serve(t, "v0", issued_at=start), False))  # from the trial's first second on
    assert t.evidence.arms["baseline"].ratings == 1


def test_votes_are_kept_for_the_newest_answers_and_none_counts_twice():
    t = trial(answer_memory=2)
    start = int(t.started_wall)
    oldest, older, newer = (serve(t, "v1", issued_at=start + i) for i in (1, 2, 3))
    for answer in (oldest, older, newer):  # a third answer voted on: the oldest's votes are forgotten
        tell(t, thumbs_on(answer, False))
    assert t.evidence.arms["canary"] == ArmStats(requests=3, ratings=3, approvals=0)  # and stay counted
    tell(t, thumbs_on(oldest, True))  # so a change of mind on it is ignored: it would count twice
    tell(t, thumbs_on(serve(t, "v1", issued_at=start + 1), True))  # as is any answer issued no later
    assert t.evidence.arms["canary"] == ArmStats(requests=4, ratings=3, approvals=0)
    tell(t, thumbs_on(older, True))  # still kept: the change counts
    tell(t, thumbs_on(serve(t, "v1", issued_at=start + 4), True))  # a newer answer counts
    assert t.evidence.arms["canary"] == ArmStats(requests=5, ratings=4, approvals=2)


def test_evidence_about_other_versions_is_ignored():
    t = trial()
    feed(t, "v7", requests=50, failures=50, downs=50)
    assert t.evidence.arms["canary"] == ArmStats() == t.evidence.arms["baseline"]


# --- Verdicts -------------------------------------------------------------------------------------


def test_rollback_on_approval_needs_a_likelihood_ratio_of_two_over_alpha():
    t = trial()
    feed(t, "v1", ups=15, downs=25)
    feed(t, "v0", ups=28, downs=12)
    # 15/40 against 28/40: log likelihood ratio 2.52 (ratio 12.5), under log(2 / 0.01) = 5.30.
    assert t.verdict(now=t.started_at) is None
    feed(t, "v0", ups=2)
    feed(t, "v1", downs=5)  # 15/45 against 30/42: 4.15
    assert t.verdict(now=t.started_at) is None
    feed(t, "v0", ups=2)
    feed(t, "v1", downs=5)  # 15/50 against 32/44: 5.97
    verdict = t.verdict()
    assert verdict.verdict == ROLLED_BACK and "15/50" in verdict.reason and "log likelihood ratio 6.0" in verdict.reason
    # The canary doing better is never a reason to roll it back.
    better = trial(min_requests=1000)
    feed(better, "v1", ups=30, downs=10)
    feed(better, "v0", ups=10, downs=30)
    assert better.verdict() is None


def test_rollback_on_comparisons():
    t = trial(min_requests=1000)
    choose(t, canary_wins=10, baseline_wins=30)  # log likelihood ratio 3.32 < 5.30
    assert t.verdict() is None
    choose(t, canary_wins=5, baseline_wins=15)  # 15 of 60: 5.61
    verdict = t.verdict()
    assert verdict.verdict == ROLLED_BACK and "preferred in 15 of 60 direct comparisons" in verdict.reason


def test_rollback_on_failures_beyond_the_baselines():
    t = trial(min_requests=1000)
    feed(t, "v1", requests=20, failures=2)
    feed(t, "v0", requests=100)
    assert t.verdict() is None  # 2 failures: under min_failures
    feed(t, "v1", requests=1, failures=1)
    assert t.verdict().verdict == ROLLED_BACK
    # The same failures while the baseline fails as often are not the canary's doing.
    both = trial(min_requests=1000)
    feed(both, "v1", requests=20, failures=3)
    feed(both, "v0", requests=20, failures=3)
    assert both.verdict() is None


def test_promotion_needs_requests_time_and_enough_evidence_that_it_is_not_worse():
    t = trial(min_seconds=60, max_seconds=600, min_requests=100)
    # All approve, 40 a side: 41/42 on both sides (one approval and one disapproval added), difference 0,
    # standard error sqrt(2 * (41/42) * (1/42) / 42) = 0.0333, precise enough (planned: 0.0373); the 95%
    # lower bound is -1.645 * 0.0333 = -0.055, above -0.10.
    feed(t, "v1", requests=59, ups=40)
    feed(t, "v0", requests=60, ups=40)
    assert t.verdict(now=t.started_at + 100) is None  # 99 canary requests
    feed(t, "v1", requests=1)
    assert t.verdict(now=t.started_at + 30) is None  # too early
    verdict = t.verdict(now=t.started_at + 61)
    assert verdict.verdict == PROMOTED and "approval: 95% lower bound -0.055 against -0.10" in verdict.reason


def test_the_promotion_test_waits_for_its_planned_precision_and_is_taken_once():
    equal = trial(min_requests=0)
    feed(equal, "v1", ups=70, downs=30)  # 100 a side at 70%: a standard error of 0.064, not yet 0.037
    feed(equal, "v0", ups=70, downs=30)
    assert equal.verdict() is None
    feed(equal, "v1", ups=175, downs=75)  # 350 a side: 0.035
    feed(equal, "v0", ups=175, downs=75)
    assert equal.verdict().verdict == PROMOTED
    # 60% against 70% at 350 a side: not a clear enough difference for the rollback test (log likelihood
    # ratio 2.0), but the bound, -0.099 - 1.645 * 0.036 = -0.158, does not exclude "worse by 10 points".
    worse = trial(min_requests=0)
    feed(worse, "v1", ups=210, downs=140)
    feed(worse, "v0", ups=245, downs=105)
    verdict = worse.verdict()
    assert verdict.verdict == ROLLED_BACK and "could be worse by more than the margin" in verdict.reason


def test_an_undecided_canary_is_rolled_back_at_the_longest_wait():
    quiet = trial(min_seconds=60, max_seconds=600)
    feed(quiet, "v1", requests=5)
    assert quiet.verdict(now=quiet.started_at + 599) is None
    verdict = quiet.verdict(now=quiet.started_at + 601)
    assert verdict.verdict == ROLLED_BACK and "not enough evidence" in verdict.reason
    # Requests enough and some ratings, all approving, still too little evidence to promote on.
    rated = trial(min_seconds=60, max_seconds=600)
    feed(rated, "v1", requests=50, ups=20)
    feed(rated, "v0", requests=50, ups=20)
    assert rated.verdict(now=rated.started_at + 599) is None
    assert rated.verdict(now=rated.started_at + 601).verdict == ROLLED_BACK
    # Only with the test switched off (min_ratings 0) do requests and time alone promote.
    untested = trial(min_seconds=60, min_ratings=0)
    feed(untested, "v1", requests=20)
    assert untested.verdict(now=untested.started_at + 61).verdict == PROMOTED


def test_the_first_verdict_is_final():
    t = trial(min_requests=0)
    choose(t, canary_wins=5, baseline_wins=55)
    first = t.verdict()
    assert first.verdict == ROLLED_BACK
    choose(t, canary_wins=5000, baseline_wins=0)  # overwhelming evidence the other way comes too late
    feed(t, "v1", ups=1000)
    feed(t, "v0", downs=1000)
    assert t.verdict() is first and t.verdict(now=t.started_at + 10**6) is first


# --- Operating characteristics in simulation ------------------------------------------------------


def simulate(trials: int, observe, seed: str) -> tuple[Counter, int]:
    """Canaries at the default configuration (less its minimum requests and time: this is about the
    evidence), each fed one observation at a time by `observe(trial, rng)` and judged after every one until
    its verdict; the count of each verdict, and the median canary sample at the verdict."""
    config = CanaryConfig(min_requests=0, min_seconds=0)
    verdicts, samples = Counter(), []
    for i in range(trials):
        rng = random.Random(f"{seed}/{i}")  # a trial's draws do not depend on when the one before it ended
        t = CanaryTrial(baseline=BASE_POLICY, canary=CANARY_V1, config=config)
        while (verdict := t.verdict(now=t.started_at)) is None:
            observe(t, rng)
        verdicts[verdict.verdict] += 1
        samples.append(t.evidence.arms["canary"].ratings or t.evidence.head_to_head.comparisons)
    return verdicts, sorted(samples)[trials // 2]


def rating(canary_rate: float, baseline_rate: float = 0.7):
    """A rating on a canary answer (the trial's share of them) or a baseline answer."""
    def observe(t: CanaryTrial, rng: random.Random) -> None:
        arm, rate = ("canary", canary_rate) if rng.random() < t.config.fraction else ("baseline", baseline_rate)
        t.evidence.arms[arm].revote(None, rng.random() < rate)
    return observe


def comparison(canary_share: float):
    def observe(t: CanaryTrial, rng: random.Random) -> None:
        t.evidence.head_to_head.revote(None, rng.random() < canary_share)
    return observe


TRIALS = 300  # canaries per simulated case: the 1.7 million verdicts of the ratings cases take seconds


def test_a_canary_ten_points_worse_is_not_promoted_and_an_equal_one_is():
    worse, worse_n = simulate(TRIALS, rating(0.6), "worse")
    equal, equal_n = simulate(TRIALS, rating(0.7), "equal")
    print(f"ratings, {TRIALS} canaries each: 0.6 against 0.7 promoted {worse[PROMOTED]} (median "
          f"{worse_n} canary ratings); 0.7 against 0.7 promoted {equal[PROMOTED]} (median {equal_n})")
    assert worse[PROMOTED] / TRIALS <= 0.10  # planned: 5% (promotion_alpha); measured 4.9% of 1,000
    assert equal[PROMOTED] / TRIALS >= 0.80  # planned: 85% less the rollback test's; measured 84.7% of 1,000
    assert 195 <= equal_n <= 240  # about 216 canary ratings beside about 500 of the baseline (30% share)


def test_a_clearly_better_canary_is_promoted_before_the_planned_sample_size():
    better, better_n = simulate(TRIALS, comparison(0.65), "h2h-better")
    print(f"comparisons, {TRIALS} canaries preferred 65%: promoted {better[PROMOTED]} (median {better_n})")
    assert better[PROMOTED] == TRIALS and better_n < 400  # the planned size is about 720 comparisons
    t = trial(min_requests=0)
    t.evidence.head_to_head.comparisons, t.evidence.head_to_head.canary_wins = 211, 143  # a demo's canary
    assert t.verdict().verdict == PROMOTED and "clearly not worse" in t.verdict().reason


def test_on_comparisons_a_less_preferred_canary_is_not_promoted_and_an_equal_one_is():
    worse, worse_n = simulate(TRIALS, comparison(0.45), "h2h-worse")
    equal, equal_n = simulate(TRIALS, comparison(0.5), "h2h-equal")
    print(f"comparisons, {TRIALS} canaries each: preferred 45% promoted {worse[PROMOTED]} (median "
          f"{worse_n}); preferred 50% promoted {equal[PROMOTED]} (median {equal_n})")
    assert worse[PROMOTED] / TRIALS <= 0.10  # measured 4.0% of 1,000
    assert equal[PROMOTED] / TRIALS >= 0.80  # measured 88.0% of 1,000
    assert 700 <= equal_n <= 720  # the planned standard error: 0.05 / 2.681 = 0.0186, at 719 comparisons


def run_canaries(canary_rate: float, trials: int, ratings: int, rolled_back, seed: int = 0) -> list[int]:
    """Canaries whose arms get one rating each in turn, judged after every one (never promoted); the rating
    count at which each was rolled back (an empty list: none was)."""
    rolled = []
    for i in range(trials):
        rng = random.Random(f"{seed}/{i}")
        t = trial(min_requests=10**9)
        arms = t.evidence.arms
        for n in range(1, ratings + 1):
            arms["canary"].revote(None, rng.random() < canary_rate)
            arms["baseline"].revote(None, rng.random() < 0.7)
            if rolled_back(t):
                rolled.append(n)
                break
    return rolled


def test_weighing_after_every_rating_keeps_false_rollbacks_under_alpha():
    """A canary as good as its baseline (approval 0.7 both), 1,000 ratings a side, judged after each."""
    trials = 300
    ours = run_canaries(0.7, trials, 1000, lambda t: t.verdict() is not None)

    def fixed_z_test(t: CanaryTrial) -> bool:  # what a one-look test at the 1% level does when peeked at
        c, b = t.evidence.arms["canary"], t.evidence.arms["baseline"]
        if min(c.ratings, b.ratings) < 50:
            return False
        comparison = approval_comparison(c.approvals, c.ratings, b.approvals, b.ratings)
        return comparison.difference / math.sqrt(comparison.null_variance) < -2.33

    naive = run_canaries(0.7, trials, 1000, fixed_z_test)
    print(f"false rollbacks of {trials}: mSPRT {len(ours)}, fixed z-test peeked at {len(naive)}")
    assert len(ours) / trials <= 0.02  # alpha = 0.01; measured 0.7% in a 2,000-rating simulation
    assert len(naive) > 2 * max(len(ours), 1)


def test_comparisons_weighed_after_each_one_stay_under_alpha_and_catch_a_less_preferred_canary():
    def run(canary_preferred: float, trials: int) -> list[int]:
        rolled = []
        for i in range(trials):
            rng, t = random.Random(f"h2h/{canary_preferred}/{i}"), trial(min_requests=10**9)
            for n in range(1, 1001):
                t.evidence.head_to_head.revote(None, rng.random() < canary_preferred)
                if t.verdict() is not None:
                    rolled.append(n)
                    break
        return sorted(rolled)

    equal, worse = run(0.5, 300), run(0.35, 100)
    print(f"comparisons: {len(equal)} of 300 equal canaries rolled back; canaries preferred 35% of the time: "
          f"{len(worse)} of 100, median after {worse[len(worse) // 2]} comparisons")
    assert len(equal) / 300 <= 0.02 and len(worse) == 100


def test_a_much_worse_canary_is_caught_early():
    caught = run_canaries(0.5, 100, 1000, lambda t: t.verdict() is not None, seed=1)
    caught.sort()
    print(f"0.5 against 0.7 approval: rolled back {len(caught)} of 100, median after {caught[50]} ratings a side")
    assert len(caught) == 100 and caught[50] < 400  # measured 135 in simulation


def test_routing_per_request_puts_every_user_on_both_arms():
    t = trial(fraction=0.3)
    # Three users, 2,000 requests each: each user's own share of canary answers is the fraction.
    for user in ("alice", "bob", None):
        share = sum(t.takes(user) for _ in range(2000)) / 2000
        assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)  # 4 standard errors: 0.041


def test_routing_per_user_keeps_a_user_on_one_arm():
    t = trial(fraction=0.1, routing="user")
    users = [uuid.uuid4().hex for _ in range(10_000)]
    share = sum(t.takes(u) for u in users) / len(users)
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(users))  # 4 standard errors: 0.012
    assert all(len({t.takes(u) for _ in range(20)}) == 1 for u in users[:100])
    anonymous = sum(t.takes(None) for _ in range(10_000)) / 10_000
    assert abs(anonymous - 0.1) < 0.012


def test_routing_per_request_is_not_confounded_by_who_is_on_which_arm():
    """Eight users, one of whom asks questions that every answer satisfies, and two versions as good as
    each other: routed per user the arms' approval differs by who is on which arm; per request it does not."""
    def approval_gap(routing: str, seed: int) -> float:
        random.seed(seed)
        t = trial(fraction=0.3, routing=routing)
        approvals = {True: [0, 0], False: [0, 0]}  # canary? -> [approved, rated]
        for i in range(4000):
            user = f"user-{i % 8}"
            approved = user == "user-0" or random.random() < 0.5
            tally = approvals[t.takes(user)]
            tally[0] += approved
            tally[1] += 1
        (ca, cn), (ba, bn) = approvals[True], approvals[False]
        return ca / max(cn, 1) - ba / max(bn, 1)

    per_request = [approval_gap("request", seed) for seed in range(20)]
    per_user = [approval_gap("user", seed) for seed in range(20)]
    # Per request: the gap is noise around 0 (s.e. about 0.017 at 1,200 against 2,800 ratings).
    assert max(abs(gap) for gap in per_request) < 0.07
    # Per user, the canary name is the same in every seed, so the arms hold the same users each time: the
    # gap is the same nonzero bias in every run (user-0's share of one arm against the other's).
    assert statistics.mean(abs(gap) for gap in per_user) > 0.04


def test_settings_read_the_canary_from_the_environment(monkeypatch):
    monkeypatch.setenv("SERVING_CANARY__FRACTION", "0.3")
    monkeypatch.setenv("SERVING_CANARY__MIN_RATINGS", "7")
    canary = ServingSettings().canary
    assert (canary.fraction, canary.min_ratings, canary.min_requests) == (0.3, 7, 200)


# --- Through the app ------------------------------------------------------------------------------


@pytest.fixture
def canary_settings(settings) -> ServingSettings:
    config = CanaryConfig(fraction=0.5, min_requests=30, min_seconds=0, min_ratings=10, max_seconds=3600,
                          check_interval_s=3600)  # reviews run when the test says so
    return settings.model_copy(update={"canary": config})


@pytest.fixture
def app_client(canary_settings, engine, events):
    def start() -> TestClient:
        return TestClient(build_app(canary_settings, lambda: engine, lambda: events), raise_server_exceptions=False)

    return start


def chat(client, **body) -> tuple[str, str]:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, **body})
    return response.headers.get("x-policy-version"), response.json().get("id")


def thumbs(client, completion_id: str, rating: str) -> None:
    response = client.post("/v1/feedback", json={"type": "thumbs", "completion_id": completion_id, "rating": rating})
    assert response.status_code == 202, response.text


def review(client) -> dict:
    client.portal.call(client.app.state.policies.review)
    return client.get("/v1/admin/policy").json()


def test_a_published_version_takes_its_share_and_ratings_roll_it_back(app_client, canary_settings, engine,
                                                                     events, tmp_path):
    registry = PolicyRegistry(canary_settings.registry_dir)
    with app_client() as client:
        publish_fake_adapter(registry, tmp_path)
        client.portal.call(client.app.state.policies.offer, "v1")
        assert engine.loaded == ["v1"]
        served = Counter()
        for _ in range(80):
            version, completion_id = chat(client)
            served[version] += 1
            thumbs(client, completion_id, "up" if version == "v0" else "down")  # users dislike v1
            if served["v0"] >= 15 and served["v1"] >= 15:  # 0/15 against 15/15: likelihood ratio 2400
                break
        # Fraction 0.5: both arms served; the canary is still on (reviews run only when called).
        state = client.get("/v1/admin/policy").json()
        assert state["current"] == "v0" and state["canary"]["version"] == "v1"
        assert state["canary"]["figures"]["canary_requests"] == served["v1"]
        assert state["canary"]["figures"]["canary_approvals"] == 0
        assert state["canary"]["figures"]["baseline_approvals"] == served["v0"]

        state = review(client)
        assert state["canary"] is None and state["current"] == "v0" and state["rolled_back"] == ["v1"]
        assert {chat(client)[0] for _ in range(20)} == {"v0"}
        [event] = events.announced
        assert (event.version, event.action) == ("v1", "rolled_back") and "approval 0/" in event.reason
        assert 'rlhf_canary_verdicts_total{verdict="rolled_back"} 1.0' in client.get("/metrics").text
    assert registry.get("v1").rolled_back

    # A restart does not bring the rolled-back version back.
    with app_client() as client:
        state = client.get("/v1/admin/policy").json()
        assert (state["current"], state["canary"]) == ("v0", None)


def test_a_canary_as_liked_as_the_current_version_is_promoted(app_client, canary_settings, events, tmp_path):
    registry = PolicyRegistry(canary_settings.registry_dir)
    with app_client() as client:
        publish_fake_adapter(registry, tmp_path)
        client.portal.call(client.app.state.policies.offer, "v1")
        served = Counter()
        while (state := review(client))["canary"] is not None:  # every answer liked, on both sides
            assert sum(served.values()) < 300, state
            version, completion_id = chat(client)
            served[version] += 1
            thumbs(client, completion_id, "up")
        assert state["current"] == "v1" and served["v1"] >= 30  # min_requests
        assert "not worse by more than the margin" in events.announced[0].reason
        assert {chat(client)[0] for _ in range(20)} == {"v1"}
        assert [(e.version, e.action) for e in events.announced] == [("v1", "promoted")]
    assert registry.get("v1").promoted and registry.get("v1").verdict["figures"]["canary_requests"] == served["v1"]
    with app_client() as client:  # after a restart the promoted version serves all traffic
        assert client.get("/v1/admin/policy").json()["current"] == "v1"


def test_a_failing_canary_is_rolled_back(app_client, canary_settings, engine, tmp_path):
    publish_fake_adapter(PolicyRegistry(canary_settings.registry_dir), tmp_path)
    engine.failing_versions = {"v1"}
    with app_client() as client:
        client.portal.call(client.app.state.policies.offer, "v1")
        statuses = Counter()
        while statuses[500] < 3:
            statuses[client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).status_code] += 1
        assert review(client)["rolled_back"] == ["v1"]
        assert {chat(client)[0] for _ in range(10)} == {"v0"}


def test_a_new_version_at_start_up_goes_into_canary(app_client, canary_settings, tmp_path):
    registry = PolicyRegistry(canary_settings.registry_dir)
    publish_fake_adapter(registry, tmp_path)
    registry.record_verdict("v1", PROMOTED, "earlier", {})
    publish_fake_adapter(registry, tmp_path)
    with app_client() as client:
        state = client.get("/v1/admin/policy").json()
        assert (state["current"], state["canary"]["version"], state["canary"]["baseline"]) == ("v1", "v2", "v1")
        # Routed per request: one user gets answers of both arms.
        assert {chat(client, user="alice")[0] for _ in range(40)} == {"v1", "v2"}
        # Pinning a version asks for that version whatever the canary.
        assert {chat(client, model="rlhf-policy@v1")[0] for _ in range(10)} == {"v1"}


def test_a_promotion_never_sends_the_canary_share_back_to_the_baseline(app_client, canary_settings, engine,
                                                                        tmp_path):
    publish_fake_adapter(PolicyRegistry(canary_settings.registry_dir), tmp_path)
    with app_client() as client:
        policies = client.app.state.policies
        client.portal.call(policies.offer, "v1")
        routed_while_loading: list[str] = []
        load = engine.load_policy

        async def slow_load(policy):  # requests keep coming while the engine loads the promoted version
            routed_while_loading.extend(policies.resolve(None).name for _ in range(100))
            await load(policy)

        engine.load_policy = slow_load
        assert client.post("/v1/admin/canary", json={"verdict": "promoted"}).json()["current"] == "v1"
        # Half the requests still go to v1 while it loads (ending the trial first sent them all to v0).
        assert set(routed_while_loading) == {"v0", "v1"}


def test_operators_conclude_or_supersede_a_canary(app_client, canary_settings, events, tmp_path):
    registry = PolicyRegistry(canary_settings.registry_dir)
    with app_client() as client:
        assert client.post("/v1/admin/canary", json={"verdict": "promoted"}).status_code == 409
        publish_fake_adapter(registry, tmp_path), publish_fake_adapter(registry, tmp_path)
        policies = client.app.state.policies
        client.portal.call(policies.offer, "v1")
        client.portal.call(policies.offer, "v2")  # a newer version supersedes v1's trial
        client.portal.call(policies.offer, "v1")  # and an older one is not tried again
        assert client.get("/v1/admin/policy").json()["canary"]["version"] == "v2"
        response = client.post("/v1/admin/canary", json={"verdict": "promoted", "reason": "looks right"})
        assert response.status_code == 200 and response.json()["current"] == "v2"
        assert registry.get("v2").verdict["reason"] == "looks right" and registry.get("v1").verdict is None
        assert client.post("/v1/admin/canary", json={"verdict": "maybe"}).status_code == 400
        publish_fake_adapter(registry, tmp_path)
        client.portal.call(policies.offer, "v3")
        assert client.post("/v1/admin/policy", json={"version": "v1"}).json()["canary"] is None  # a pin ends it
    assert [(e.version, e.action) for e in events.announced] == [("v2", "promoted")]


def test_ab_requests_compare_the_canary_head_to_head(app_client, canary_settings, events, tmp_path):
    publish_fake_adapter(PolicyRegistry(canary_settings.registry_dir), tmp_path)
    with app_client() as client:
        client.portal.call(client.app.state.policies.offer, "v1")
        for _ in range(40):  # users prefer the current version's answer every time
            body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "ab": True}).json()
            versions = [choice["policy_version"] for choice in body["choices"]]
            assert sorted(versions) == ["v0", "v1"]
            response = client.post("/v1/feedback", json={
                "type": "pairwise", "preference": "a" if versions[0] == "v0" else "b",
                "a": {"completion_id": body["id"], "choice_index": 0},
                "b": {"completion_id": body["id"], "choice_index": 1}})
            assert response.status_code == 202, response.text
        figures = client.get("/v1/admin/policy").json()["canary"]["figures"]
        assert (figures["comparisons"], figures["canary_wins"]) == (40, 0)
        assert review(client)["rolled_back"] == ["v1"]
        [event] = events.announced
        assert "preferred in 0 of 40 direct comparisons" in event.reason
        # Without a canary (or a candidate), A/B draws two answers of the current version.
        body = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1, "ab": True}).json()
        assert [choice["policy_version"] for choice in body["choices"]] == ["v0", "v0"]


@pytest.fixture
def admin_client(canary_settings, engine, events):
    settings = canary_settings.model_copy(update={"admin_key": "operator-key"})
    with TestClient(build_app(settings, lambda: engine, lambda: events), raise_server_exceptions=False) as client:
        yield client


def test_pinned_and_operators_requests_and_repeated_thumbs_are_no_evidence(admin_client, canary_settings,
                                                                          tmp_path):
    client = admin_client
    publish_fake_adapter(PolicyRegistry(canary_settings.registry_dir), tmp_path)
    client.portal.call(client.app.state.policies.offer, "v1")
    operator = {"authorization": "Bearer operator-key"}
    for model in ("rlhf-policy@v1", "rlhf-policy@v0"):  # measuring each version on pinned requests
        for _ in range(10):
            version, completion_id = chat(client, model=model)
            thumbs(client, completion_id, "down")
    for _ in range(10):  # an operator trying the served model
        response = client.post("/v1/chat/completions", headers=operator,
                               json={"messages": USER, "max_tokens": 1})
        thumbs(client, response.json()["id"], "down")
    figures = client.get("/v1/admin/policy", headers=operator).json()["canary"]["figures"]
    assert figures["canary_requests"] == figures["baseline_requests"] == figures["canary_ratings"] == 0
    # Served by the canary's rules, each answer counts once: the latest thumbs of its (anonymous) user.
    answers = Counter()
    while min(answers.values(), default=0) < 2 or len(answers) < 2:
        version, completion_id = chat(client)
        answers[version] += 1
        for rating in ("down", "down", "up", "down", "up"):
            thumbs(client, completion_id, rating)
    figures = client.get("/v1/admin/policy", headers=operator).json()["canary"]["figures"]
    assert (figures["canary_requests"], figures["canary_ratings"], figures["canary_approvals"]) == (
        answers["v1"], answers["v1"], answers["v1"])
    assert (figures["baseline_ratings"], figures["baseline_approvals"]) == (answers["v0"], answers["v0"])


def test_another_replicas_verdict_stands(app_client, canary_settings, events, tmp_path):
    """The registry already holds a verdict on the canary (another replica's, not yet announced here):
    this replica's evidence, however strong the other way, does not replace it."""
    registry = PolicyRegistry(canary_settings.registry_dir)
    with app_client() as client:
        publish_fake_adapter(registry, tmp_path)
        client.portal.call(client.app.state.policies.offer, "v1")
        registry.record_verdict("v1", ROLLED_BACK, "replica 2: worse", {})
        served = Counter()
        while served["v1"] < 40 or served["v0"] < 40:  # enough liked answers to promote it here
            version, completion_id = chat(client)
            served[version] += 1
            thumbs(client, completion_id, "up")
        state = review(client)
        assert (state["current"], state["canary"], state["rolled_back"]) == ("v0", None, ["v1"])
        assert events.announced == [] and registry.get("v1").verdict["reason"] == "replica 2: worse"
        # An operator's verdict still replaces any other.
        publish_fake_adapter(registry, tmp_path)
        client.portal.call(client.app.state.policies.offer, "v2")
        registry.record_verdict("v2", ROLLED_BACK, "replica 2: worse", {})
        assert client.post("/v1/admin/canary", json={"verdict": "promoted"}).json()["current"] == "v2"
        assert registry.get("v2").promoted
