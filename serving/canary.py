"""The canary: a newly published version serves a share of the traffic beside the current one until the
evidence promotes it to all of it, or rolls it back.

The two arms run side by side over the same window, so a change in traffic or in users' mood affects
both alike. Evidence, per arm: the requests served and how many failed, and the answers users rated
(thumbs, and 1-7 ratings: 5 and up approves, 3 and down disapproves, 4 says nothing). And head to head:
while a canary runs (and no A/B candidate is set), A/B requests compare it with the baseline, and a
pairwise choice between the two is direct evidence of which users prefer.

Serving weighs the evidence every second, so a fixed-sample test would be peeked at thousands of times:
judged after each of 1,000 ratings a side, a z-test at 2.33 (1% for one look) rolled back 27 of 300
simulated canaries as good as their baseline (tests/serving/test_canary.py). Approval is judged instead
by a mixture sequential probability ratio test (mSPRT; Johari et al., "Always valid inference", 2017):
under "no difference" its likelihood ratio exceeds 1/alpha with probability at most alpha however often
it is looked at. The difference of approval rates is approximately normal with variance V (pooled);
mixing the alternative over differences N(0, tau^2) gives

    Lambda = sqrt(V / (V + tau^2)) * exp(diff^2 * tau^2 / (2 V (V + tau^2)))

The same test, on the canary's share of the direct comparisons against 1/2 (V = 1 / (4 n)), judges
those. Each of the two tests runs at alpha / 2, so together they stay within alpha. In the same
simulations at alpha 1%: none of 300 equal canaries was rolled back on ratings, none of 300 on
comparisons; all of 100 canaries at 50% approval against 70% were, after a median of 145 ratings a side,
and all of 100 preferred in 35% of the comparisons, after a median of 146.

The canary is rolled back as soon as either test finds it worse (Lambda >= 2 / alpha), or its failure
rate exceeds the baseline's by `max_failure_rate_excess` (after at least `min_failures` failures). It is
promoted once it has served `min_requests` requests for `min_seconds`, with `min_ratings` ratings on
each arm (or as many comparisons), neither its approval rate nor its share of the comparisons more than
`promotion_margin` below the baseline's. Short of requests or ratings, it is promoted after
`max_seconds` (the trainer's evaluation gate has already tested it offline, and no feedback is no
evidence against it; a quiet deployment must not keep its canaries forever) unless it is still below
that margin then: not proven worse, but the baseline is the version known to be good.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from common.registry import PROMOTED, ROLLED_BACK, PolicyVersion
from feedback import Feedback, PairwiseFeedback, RatingFeedback, ThumbsFeedback


class CanaryConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float = Field(0.1, ge=0, le=1, description="Share of the requests that name no version the "
                            "canary gets; 0: no canary, each new version gets all of the traffic at once.")
    min_requests: int = Field(200, ge=0, description="Requests the canary serves before it can be promoted.")
    min_seconds: float = Field(600, ge=0, description="Shortest canary, in seconds.")
    min_ratings: int = Field(50, ge=0, description="Rated answers each arm needs for a promotion before "
                             "`max_seconds`.")
    max_seconds: float = Field(3600, ge=0, description="After this, a canary short of requests or ratings "
                               "with nothing against it is promoted.")
    rollback_alpha: float = Field(0.01, gt=0, lt=1, description="Bound on the chance of rolling back a canary "
                                  "users like as much as the baseline, however long it runs.")
    effect_scale: float = Field(0.2, gt=0, le=1, description="tau: the size of approval differences the test "
                                "is tuned to (the mixture's spread).")
    promotion_margin: float = Field(0.05, ge=0, le=1, description="No promotion while the canary's approval "
                                    "rate is more than this below the baseline's.")
    min_failures: int = Field(3, ge=1, description="Failed canary requests before failures can roll it back.")
    max_failure_rate_excess: float = Field(0.05, ge=0, le=1, description="Roll back when the canary's failure "
                                           "rate exceeds the baseline's by more than this.")
    check_interval_s: float = Field(1.0, gt=0, description="How often serving weighs the evidence.")


@dataclass
class ArmStats:
    requests: int = 0
    failures: int = 0
    ratings: int = 0
    approvals: int = 0

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def approval_rate(self) -> float:
        return self.approvals / self.ratings if self.ratings else 0.0


@dataclass
class HeadToHead:
    """Pairwise choices between a canary answer and a baseline answer to the same prompt (A/B); ties skip."""

    comparisons: int = 0
    canary_wins: int = 0


@dataclass(frozen=True)
class Verdict:
    verdict: str  # PROMOTED or ROLLED_BACK
    reason: str


def approval(feedback: Feedback) -> bool | None:
    """Whether a piece of feedback approves of its answer; None when it says neither."""
    if isinstance(feedback, ThumbsFeedback):
        return feedback.rating == "up"
    if isinstance(feedback, RatingFeedback) and feedback.score != 4:
        return feedback.score >= 5
    return None


def preferred_first(feedback: Feedback) -> tuple[int, int] | None:
    """For a pairwise choice, the positions (in `referenced_choices` order) of the preferred answer and the
    other; None for a tie and for other kinds. Rankings are left out: their K-choose-2 pairs are not
    independent observations."""
    if isinstance(feedback, PairwiseFeedback) and feedback.preference != "tie":
        return (0, 1) if feedback.preference == "a" else (1, 0)
    return None


def mixture_ratio(difference: float, variance: float, tau: float) -> float:
    """mSPRT likelihood ratio of "the difference is not 0" (mixed over N(0, tau^2)) to "it is 0", for an
    estimate `difference` with `variance` under "it is 0"."""
    if variance == 0:  # every observation the same: no evidence of a difference
        return 1.0
    mixed = variance + tau**2
    return math.sqrt(variance / mixed) * math.exp(difference**2 * tau**2 / (2 * variance * mixed))


def approval_evidence(canary: ArmStats, baseline: ArmStats, tau: float) -> tuple[float, float]:
    """(canary's approval rate - baseline's, likelihood ratio of "they differ" to "they do not")."""
    difference = canary.approval_rate - baseline.approval_rate
    pooled = (canary.approvals + baseline.approvals) / (canary.ratings + baseline.ratings)
    variance = pooled * (1 - pooled) * (1 / canary.ratings + 1 / baseline.ratings)
    return difference, mixture_ratio(difference, variance, tau)


def preference_evidence(h2h: HeadToHead, tau: float) -> tuple[float, float]:
    """(canary's win rate in direct comparisons - 1/2, likelihood ratio of "one is preferred" to "neither")."""
    difference = h2h.canary_wins / h2h.comparisons - 0.5
    return difference, mixture_ratio(difference, 0.25 / h2h.comparisons, tau)


@dataclass
class CanaryTrial:
    baseline: PolicyVersion
    canary: PolicyVersion
    config: CanaryConfig
    started_at: float = field(default_factory=time.monotonic)
    arms: dict[str, ArmStats] = field(default_factory=lambda: {"baseline": ArmStats(), "canary": ArmStats()})
    head_to_head: HeadToHead = field(default_factory=HeadToHead)

    def takes(self, user_hash: str | None) -> bool:
        """Whether a request goes to the canary. A known user stays on one arm for the whole trial."""
        if user_hash is None:
            return random.random() < self.config.fraction
        digest = hashlib.sha256(f"{self.canary.name}/{user_hash}".encode()).digest()
        return int.from_bytes(digest[:8]) / 2**64 < self.config.fraction

    def _arm(self, version: str) -> ArmStats | None:
        # Requests pinned to other versions are no evidence about either arm.
        return {self.baseline.name: self.arms["baseline"], self.canary.name: self.arms["canary"]}.get(version)

    def observe_request(self, version: str, failed: bool) -> None:
        if arm := self._arm(version):
            arm.requests += 1
            arm.failures += failed

    def observe_rating(self, version: str, approved: bool) -> None:
        if arm := self._arm(version):
            arm.ratings += 1
            arm.approvals += approved

    def observe_choice(self, preferred: str, other: str) -> None:
        if {preferred, other} == {self.baseline.name, self.canary.name}:
            self.head_to_head.comparisons += 1
            self.head_to_head.canary_wins += preferred == self.canary.name

    def verdict(self, now: float | None = None) -> Verdict | None:
        """Roll back, promote, or (None) keep watching."""
        c, b, cfg = self.arms["canary"], self.arms["baseline"], self.config
        if c.failures >= cfg.min_failures and c.failure_rate - b.failure_rate > cfg.max_failure_rate_excess:
            return Verdict(ROLLED_BACK, f"{c.failures} of {c.requests} requests failed "
                                        f"(baseline {b.failures} of {b.requests})")
        # Two tests, one on ratings and one on direct comparisons, each at alpha / 2: together they roll
        # back a canary as good as its baseline with probability at most alpha.
        threshold = 2 / cfg.rollback_alpha
        h = self.head_to_head
        evidence = f"approval {c.approvals}/{c.ratings} against the baseline's {b.approvals}/{b.ratings}"
        if h.comparisons:
            evidence += f", preferred in {h.canary_wins} of {h.comparisons} direct comparisons"
        approval_gap = preference_gap = 0.0
        if min(c.ratings, b.ratings) > 0:
            approval_gap, ratio = approval_evidence(c, b, cfg.effect_scale)
            if approval_gap < 0 and ratio >= threshold:
                return Verdict(ROLLED_BACK, f"{evidence} (ratings: likelihood ratio {ratio:.0f})")
        if h.comparisons > 0:
            preference_gap, ratio = preference_evidence(h, cfg.effect_scale)
            if preference_gap < 0 and ratio >= threshold:
                return Verdict(ROLLED_BACK, f"{evidence} (comparisons: likelihood ratio {ratio:.0f})")
        elapsed = (time.monotonic() if now is None else now) - self.started_at
        leaning_worse = min(approval_gap, preference_gap) < -cfg.promotion_margin
        rated = min(c.ratings, b.ratings) >= cfg.min_ratings or h.comparisons >= cfg.min_ratings
        if c.requests >= cfg.min_requests and rated and elapsed >= cfg.min_seconds and not leaning_worse:
            return Verdict(PROMOTED, f"{c.requests} requests, {evidence}")
        if elapsed >= cfg.max_seconds:  # short of traffic or ratings: decide on what there is
            if leaning_worse:  # not proven worse, but the baseline is the one known to be good
                return Verdict(ROLLED_BACK, f"still {evidence} after {elapsed:.0f} s")
            return Verdict(PROMOTED, f"{c.requests} requests in {elapsed:.0f} s, nothing against it ({evidence})")
        return None

    def figures(self) -> dict[str, float]:
        """Flat numbers for the registry's verdict record, the admin API and the metrics."""
        out: dict[str, float] = {"fraction": self.config.fraction,
                                 "seconds": time.monotonic() - self.started_at}
        for arm, stats in self.arms.items():
            out.update({f"{arm}_{name}": value for name, value in asdict(stats).items()})
        return out | asdict(self.head_to_head)
