"""The canary: a newly published version serves a share of the traffic beside the current one until the
evidence promotes it to all of it, or rolls it back.

The two arms run side by side over the same window, so a change in traffic or in users' mood affects
both alike. Evidence, per arm: the requests served and how many failed, and the answers users rated
(thumbs, and 1-7 ratings: 5 and up approves, 3 and down disapproves, 4 says nothing). The canary is
rolled back as soon as its failure rate exceeds the baseline's by `max_failure_rate_excess` (after at
least `min_failures` failures), or its approval rate is below the baseline's by more than `rollback_z`
standard errors (two-proportion z-test, pooled; each arm with at least `min_ratings` ratings). It is
promoted once it has served `min_requests` requests for `min_seconds`, with `min_ratings` ratings on
each arm, or without them after `max_seconds`: the trainer's evaluation gate has already tested it
offline, and no feedback is no evidence against it.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from common.registry import PROMOTED, ROLLED_BACK, PolicyVersion
from feedback import Feedback, RatingFeedback, ThumbsFeedback


class CanaryConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float = Field(0.1, ge=0, le=1, description="Share of the requests that name no version the "
                            "canary gets; 0: no canary, each new version gets all of the traffic at once.")
    min_requests: int = Field(200, ge=0, description="Requests the canary serves before it can be promoted.")
    min_seconds: float = Field(600, ge=0, description="Shortest canary, in seconds.")
    min_ratings: int = Field(50, ge=0, description="Rated answers each arm needs before approval decides.")
    max_seconds: float = Field(3600, ge=0, description="After this, a canary short of ratings with nothing "
                               "against it is promoted.")
    rollback_z: float = Field(2.33, gt=0, description="Roll back when the canary's approval rate is this many "
                              "standard errors below the baseline's (2.33: one-sided 1% for equal versions).")
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


def approval_z(canary: ArmStats, baseline: ArmStats) -> float:
    """(canary's approval rate - baseline's) / its standard error under "no difference" (pooled)."""
    pooled = (canary.approvals + baseline.approvals) / (canary.ratings + baseline.ratings)
    se = math.sqrt(pooled * (1 - pooled) * (1 / canary.ratings + 1 / baseline.ratings))
    return (canary.approval_rate - baseline.approval_rate) / se if se > 0 else 0.0


@dataclass
class CanaryTrial:
    baseline: PolicyVersion
    canary: PolicyVersion
    config: CanaryConfig
    started_at: float = field(default_factory=time.monotonic)
    arms: dict[str, ArmStats] = field(default_factory=lambda: {"baseline": ArmStats(), "canary": ArmStats()})

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

    def verdict(self, now: float | None = None) -> Verdict | None:
        """Roll back, promote, or (None) keep watching."""
        c, b, cfg = self.arms["canary"], self.arms["baseline"], self.config
        if c.failures >= cfg.min_failures and c.failure_rate - b.failure_rate > cfg.max_failure_rate_excess:
            return Verdict(ROLLED_BACK, f"{c.failures} of {c.requests} requests failed "
                                        f"(baseline {b.failures} of {b.requests})")
        rated = min(c.ratings, b.ratings) >= max(cfg.min_ratings, 1)
        if rated and (z := approval_z(c, b)) < -cfg.rollback_z:
            return Verdict(ROLLED_BACK, f"approval {c.approvals}/{c.ratings} against the baseline's "
                                        f"{b.approvals}/{b.ratings} (z = {z:.2f})")
        elapsed = (time.monotonic() if now is None else now) - self.started_at
        if c.requests >= cfg.min_requests and elapsed >= cfg.min_seconds:
            if min(c.ratings, b.ratings) >= cfg.min_ratings:
                return Verdict(PROMOTED, f"{c.requests} requests, approval {c.approvals}/{c.ratings} "
                                         f"against the baseline's {b.approvals}/{b.ratings}")
            if elapsed >= cfg.max_seconds:
                return Verdict(PROMOTED, f"{c.requests} requests in {elapsed:.0f} s, too few ratings to judge "
                                         f"({c.ratings} and {b.ratings}), none against it")
        return None

    def figures(self) -> dict[str, float]:
        """Flat numbers for the registry's verdict record, the admin API and the metrics."""
        out: dict[str, float] = {"fraction": self.config.fraction,
                                 "seconds": time.monotonic() - self.started_at}
        for arm, stats in self.arms.items():
            out.update({f"{arm}_{name}": value for name, value in asdict(stats).items()})
        return out
