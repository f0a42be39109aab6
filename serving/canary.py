"""The canary: a newly published version serves a share of the traffic beside the current one until the
evidence promotes it to all of it, or rolls it back. The first verdict on a version is final.

The two arms run side by side over the same window, so a change in traffic or in users' mood affects
both alike. Evidence, per arm (serving/canary_evidence.py: once per answer and user, latest rating wins;
pinned and operators' requests excluded): the requests this replica served and how many failed, and the
answers users rated (thumbs, and 1-7 ratings: 5 and up approves, 3 and down disapproves), whichever
replica served them: the signed completion id says what the feedback needs. And head to head: while a
canary runs (and no A/B candidate is set), A/B requests compare it with the baseline, and a pairwise
choice between the two is direct evidence of which users prefer.

Rollback (serving/canary_stats.py has the tests). Serving weighs the evidence every second, so a
fixed-sample test would be peeked at thousands of times: judged after each of 1,000 ratings a side, a
z-test at 2.33 (1% for one look) rolled back 27 of 300 simulated canaries as good as their baseline. A
canary is rolled back as soon as a mixture sequential probability ratio test (mSPRT), on its approval rate
against the baseline's or on its share of the direct comparisons against 1/2, finds it worse: each test at
`rollback_alpha` / 2, so a canary as good as its baseline is rolled back with probability at most
`rollback_alpha` (1%) however long it runs; or as soon as its failure rate exceeds the baseline's by
`max_failure_rate_excess` (after at least `min_failures` failures).

Promotion: a one-sided non-inferiority test, taken once, at alpha `promotion_alpha` (5%). It waits until
the evidence of one kind is precise enough for the planned power: the standard error of the difference at
most margin / (z(1 - alpha) + z(power)), with at least `min_ratings` on each side, after `min_requests`
canary requests and `min_seconds`. Then, for each kind precise enough (usually one), the 95% lower
confidence bound of the canary's approval rate minus the baseline's must be above -`promotion_margin`
(10 points), and that of its share of the direct comparisons minus 1/2 above -`preference_margin` (5
points: the share a 10-point approval gap gives if each choice is two independent thumbs, ties split).
If so the canary is promoted, otherwise rolled back. A canary worse by the margin is promoted with
probability about 5%; an equal one with probability 85% (`promotion_power`, the power at this sample
size). The default sample size, at the default 30% share and 70% approval: about 216 canary ratings
beside 500 of the baseline (720 in all; at a 10% share 1,700, at 50% 600), or about 720 comparisons.
The share is 30%, not the usual 10%, because at 10% a decision needs 1,700 ratings: more than a
low-traffic deployment (and `make demo`'s users, about 1 rating/s) give in the 30 minutes a round takes.
In simulation (1,000 canaries per case at the default configuration, judged after every observation; the
tests run 300): at 60% approval against 70%, 4.9% were promoted and 95.1% rolled back (after a median of
232 canary ratings); at 70% against 70%, 84.7% were promoted (median 215). On comparisons: preferred in
45%, 3.6% promoted; preferred in 50%, 87.2% promoted (about 715 comparisons).

A canary still undecided after `max_seconds` (too little traffic or feedback) is rolled back: the
baseline is the version known to be good, and no evidence is no reason to promote.

Routing (`routing`): by default each request goes to the canary with probability `fraction`, whoever
sends it, so the two arms see the same users asking the same mix of questions. Users differ far more
than versions do (a user who asks small talk approves nearly every answer): with a user kept on one arm,
the approval comparison is one of who is on which arm. In `make demo` (8 users, one of them on the canary
arm) approval went 17/46 on the canary against 238/406 while pinned held-out questions rated the canary
better. Per-request routing makes the comparison a randomised one; a user's ratings then fall on both
arms, and the tests take ratings as independent. `routing="user"` keeps each user on one arm for the
trial (one model through a conversation): sound only with many users, each giving few ratings, since
then the bounds are narrower than they should be.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.registry import PROMOTED, ROLLED_BACK, PolicyVersion
from feedback import Feedback
from serving.canary_evidence import Evidence
from serving.canary_stats import (
    Comparison,
    approval_comparison,
    planned_standard_error,
    preference_comparison,
)
from serving.completion_ids import ServedAnswer


class CanaryConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float = Field(0.3, ge=0, le=1, description="Share of the requests that name no version the "
                            "canary gets; 0: no canary, each new version gets all of the traffic at once.")
    routing: Literal["request", "user"] = Field("request", description="What the canary's share is drawn "
                                                "over: each request (a randomised comparison, the default) or "
                                                "each user, kept on one arm for the trial (needs many users).")
    min_requests: int = Field(200, ge=0, description="Requests the canary serves before it can be promoted.")
    min_seconds: float = Field(600, ge=0, description="Shortest canary, in seconds.")
    min_ratings: int = Field(50, ge=0, description="Ratings each arm (or comparisons) the promotion test needs "
                             "at the least, for its normal approximation. 0: no promotion test, a canary is "
                             "promoted after `min_requests` and `min_seconds` unless rolled back (short "
                             "canaries in tests; not for a loop trusted with users).")
    max_seconds: float = Field(7200, ge=0, description="A canary still undecided after this is rolled back: "
                               "too little evidence to promote it.")
    rollback_alpha: float = Field(0.01, gt=0, lt=1, description="Bound on the chance of rolling back a canary "
                                  "users like as much as the baseline, however long it runs.")
    effect_scale: float = Field(0.2, gt=0, le=1, description="tau: the size of differences the rollback test "
                                "is tuned to (the mixture's spread).")
    promotion_margin: float = Field(0.10, gt=0, le=1, description="Promotion needs the evidence to exclude an "
                                    "approval rate lower than the baseline's by this much.")
    preference_margin: float = Field(0.05, gt=0, le=0.5, description="Or to exclude a share of the direct "
                                     "comparisons lower than 1/2 by this much.")
    promotion_alpha: float = Field(0.05, gt=0, lt=0.5, description="Chance of promoting a canary worse by the "
                                   "margin (the one-sided level of the non-inferiority test).")
    promotion_power: float = Field(0.85, gt=0.5, lt=1, description="Planned chance of promoting a canary as "
                                   "good as its baseline: it sets how much evidence the test waits for.")
    answer_memory: int = Field(100_000, ge=1, description="Rated answers whose votes a trial keeps, so that "
                               "a user's later vote replaces theirs; feedback on older ones is no evidence.")
    min_failures: int = Field(3, ge=1, description="Failed canary requests before failures can roll it back.")
    max_failure_rate_excess: float = Field(0.05, ge=0, le=1, description="Roll back when the canary's failure "
                                           "rate exceeds the baseline's by more than this.")
    check_interval_s: float = Field(1.0, gt=0, description="How often serving weighs the evidence.")


@dataclass(frozen=True)
class Verdict:
    verdict: str  # PROMOTED or ROLLED_BACK
    reason: str


@dataclass(frozen=True)
class _Test:
    """One kind of evidence with the margin and the precision its promotion test needs."""

    name: str
    comparison: Comparison
    margin: float
    planned_standard_error: float

    @property
    def ready(self) -> bool:
        return self.comparison.standard_error <= self.planned_standard_error


@dataclass
class CanaryTrial:
    baseline: PolicyVersion
    canary: PolicyVersion
    config: CanaryConfig
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)  # answers issued before it are no evidence
    evidence: Evidence = field(init=False)
    decided: Verdict | None = field(default=None, init=False)  # the first verdict, final

    def __post_init__(self):
        self.evidence = Evidence(self.baseline.name, self.canary.name, self.config.answer_memory,
                                 since=self.started_wall)

    def takes(self, user_hash: str | None) -> bool:
        """Whether a request goes to the canary; with routing "user", a known user stays on one arm."""
        if self.config.routing == "request" or user_hash is None:
            return random.random() < self.config.fraction
        digest = hashlib.sha256(f"{self.canary.name}/{user_hash}".encode()).digest()
        return int.from_bytes(digest[:8]) / 2**64 < self.config.fraction

    def observe_request(self, versions: Sequence[str], failed: bool) -> None:
        """A request this trial routed (neither pinned nor an operator's): `versions[i]` wrote choice i."""
        self.evidence.observe_request(versions, failed)

    def observe_feedback(self, feedback: Feedback, user_hash: str | None,
                         answers: Sequence[ServedAnswer]) -> None:
        """Feedback on `answers` (their verified ids), served by any replica."""
        self.evidence.observe_feedback(feedback, user_hash, answers)

    def verdict(self, now: float | None = None) -> Verdict | None:
        """Roll back, promote, or (None) keep watching. Once reached, the verdict stays."""
        if self.decided is None:
            self.decided = self._judge((time.monotonic() if now is None else now) - self.started_at)
        return self.decided

    def _judge(self, elapsed: float) -> Verdict | None:
        c, b, cfg = self.evidence.arms["canary"], self.evidence.arms["baseline"], self.config
        if c.failures >= cfg.min_failures and c.failure_rate - b.failure_rate > cfg.max_failure_rate_excess:
            return Verdict(ROLLED_BACK, f"{c.failures} of {c.requests} requests failed "
                                        f"(baseline {b.failures} of {b.requests})")
        tests = self._tests()
        # Two mSPRTs, each at alpha / 2: together they roll back a canary as good as its baseline with
        # probability at most alpha.
        threshold = math.log(2 / cfg.rollback_alpha)
        for test in tests:
            llr = test.comparison.log_likelihood_ratio(cfg.effect_scale)
            if test.comparison.difference < 0 and llr >= threshold:
                return Verdict(ROLLED_BACK, f"{self._evidence()} ({test.name}: log likelihood ratio {llr:.1f}, "
                                            f"threshold {threshold:.1f})")
        if c.requests >= cfg.min_requests and elapsed >= cfg.min_seconds:
            if cfg.min_ratings == 0:
                return Verdict(PROMOTED, f"{c.requests} requests with nothing against them, no promotion test "
                                         f"(min_ratings 0); {self._evidence()}")
            if early := self._clearly_not_worse(tests):
                return early
            if ready := [t for t in tests if t.ready and t.comparison.observations >= cfg.min_ratings]:
                return self._non_inferiority(ready)
        if elapsed >= cfg.max_seconds:
            return Verdict(ROLLED_BACK, f"not enough evidence to promote it in {elapsed:.0f} s "
                                        f"({c.requests} requests, {self._evidence()})")
        return None

    def _tests(self) -> list[_Test]:
        c, b = self.evidence.arms["canary"], self.evidence.arms["baseline"]
        h, cfg = self.evidence.head_to_head, self.config
        tests = []
        if min(c.ratings, b.ratings) > 0:
            tests.append(_Test("approval", approval_comparison(c.approvals, c.ratings, b.approvals, b.ratings),
                               cfg.promotion_margin, self._planned(cfg.promotion_margin)))
        if h.comparisons > 0:
            tests.append(_Test("comparisons", preference_comparison(h.canary_wins, h.comparisons),
                               cfg.preference_margin, self._planned(cfg.preference_margin)))
        return tests

    def _planned(self, margin: float) -> float:
        return planned_standard_error(margin, self.config.promotion_alpha, self.config.promotion_power)

    def _evidence(self) -> str:
        c, b, h = self.evidence.arms["canary"], self.evidence.arms["baseline"], self.evidence.head_to_head
        said = f"approval {c.approvals}/{c.ratings} against the baseline's {b.approvals}/{b.ratings}"
        return said + (f", preferred in {h.canary_wins} of {h.comparisons} direct comparisons" if h.comparisons else "")

    def _clearly_not_worse(self, tests: list[_Test]) -> Verdict | None:
        """Early promotion: an always-valid lower bound above -margin on one kind of evidence (with
        `min_ratings` of it), and no kind's estimate below -margin."""
        cfg = self.config
        if any(t.comparison.difference < -t.margin for t in tests):
            return None
        for t in tests:
            bound = t.comparison.always_valid_lower_bound(cfg.promotion_alpha, cfg.effect_scale)
            if t.comparison.observations >= cfg.min_ratings and bound > -t.margin:
                return Verdict(PROMOTED, f"clearly not worse ({t.name}: always-valid {1 - cfg.promotion_alpha:.0%} "
                                         f"lower bound {bound:+.3f} against -{t.margin:.2f}); {self._evidence()}")
        return None

    def _non_inferiority(self, tests: list[_Test]) -> Verdict:
        """The promotion test, once: every kind of evidence precise enough must exclude "worse by its margin"."""
        level = f"{1 - self.config.promotion_alpha:.0%}"
        bounds = [(t, t.comparison.lower_bound(self.config.promotion_alpha)) for t in tests]
        said = "; ".join(f"{t.name}: {level} lower bound {bound:+.3f} against -{t.margin:.2f}" for t, bound in bounds)
        if all(bound > -t.margin for t, bound in bounds):
            return Verdict(PROMOTED, f"not worse by more than the margin ({said}); {self._evidence()}")
        return Verdict(ROLLED_BACK, f"could be worse by more than the margin ({said}); {self._evidence()}")

    def figures(self) -> dict[str, float]:
        """Flat numbers for the registry's verdict record, the admin API and the metrics."""
        out: dict[str, float] = {"fraction": self.config.fraction,
                                 "seconds": time.monotonic() - self.started_at}
        for arm, stats in self.evidence.arms.items():
            out.update({f"{arm}_{name}": value for name, value in asdict(stats).items()})
        return out | asdict(self.evidence.head_to_head)
