"""What a canary trial counts as evidence, and how often: once per answer and user, the latest rating wins.

Only answers the trial itself routed count. Serving reports each finished request it routed by the served
model name (not pinned to a version, not an operator's: serving/chat.py) with its completion id and the
version of each choice; the trial remembers the newest `memory` of them. Feedback on any other answer
(a pinned request's, one served before the trial, one forgotten) is no evidence.

A thumbs or a 1-7 rating on a remembered answer is its user's vote (the feedback event's `user_hash`;
without one, the answer has a single anonymous vote): 5-7 and thumbs up approve, 1-3 and thumbs down
disapprove, 4 says neither and withdraws an earlier vote. A later vote of the same user on the same answer
replaces the earlier one. A pairwise choice between a canary answer and a baseline answer is likewise one
vote per pair of answers and user (a tie withdraws it). Rankings are left out: their K-choose-2 pairs are
not independent observations. A vote is kept as long as its answer is remembered; a vote on an answer
forgotten since is ignored, so no vote ever counts twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from feedback import ChoiceRef, Feedback, PairwiseFeedback, RatingFeedback, ThumbsFeedback

Vote = bool | None  # approves / prefers the canary; None: no vote (never given, or withdrawn)


def _change(old: Vote, new: Vote) -> tuple[int, int]:
    """How replacing vote `old` with `new` changes a tally's (votes, yes votes)."""
    return (new is not None) - (old is not None), (new is True) - (old is True)


@dataclass
class ArmStats:
    requests: int = 0
    failures: int = 0
    ratings: int = 0
    approvals: int = 0

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def revote(self, old: Vote, new: Vote) -> None:
        votes, yes = _change(old, new)
        self.ratings += votes
        self.approvals += yes


@dataclass
class HeadToHead:
    """Pairwise choices between a canary answer and a baseline answer (A/B); ties are no vote."""

    comparisons: int = 0
    canary_wins: int = 0

    def revote(self, old: Vote, new: Vote) -> None:
        votes, yes = _change(old, new)
        self.comparisons += votes
        self.canary_wins += yes


def approval(feedback: Feedback) -> Vote:
    """Whether a thumbs or a rating approves of its answer; None when it says neither (and for other kinds)."""
    if isinstance(feedback, ThumbsFeedback):
        return feedback.rating == "up"
    if isinstance(feedback, RatingFeedback) and feedback.score != 4:
        return feedback.score >= 5
    return None


@dataclass
class _Answer:
    versions: tuple[str, ...]  # the version that wrote each choice
    votes: dict[tuple, bool] = field(default_factory=dict)  # (what was judged, user) -> the latest vote


class Evidence:
    """The two arms' requests, failures and votes over one trial."""

    def __init__(self, baseline: str, canary: str, memory: int):
        self.arms = {"baseline": ArmStats(), "canary": ArmStats()}
        self.head_to_head = HeadToHead()
        self._arm_of = {baseline: self.arms["baseline"], canary: self.arms["canary"]}
        self._canary = canary
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self._memory = memory

    def observe_request(self, completion_id: str, versions: Sequence[str], failed: bool) -> None:
        """A request the trial routed: `versions[i]` wrote (or failed to write) its choice i."""
        for version in set(versions):
            if arm := self._arm_of.get(version):
                arm.requests += 1
                arm.failures += failed
        if not failed and any(version in self._arm_of for version in versions):
            self._answers[completion_id] = _Answer(tuple(versions))
            while len(self._answers) > self._memory:
                self._answers.popitem(last=False)

    def observe_feedback(self, feedback: Feedback, user: str | None) -> None:
        if isinstance(feedback, ThumbsFeedback | RatingFeedback):
            self._rate(feedback, user, approval(feedback))
        elif isinstance(feedback, PairwiseFeedback):
            self._choose(feedback, user)

    def _version(self, ref: ChoiceRef) -> str | None:
        answer = self._answers.get(ref.completion_id)
        return answer.versions[ref.choice_index] if answer and ref.choice_index < len(answer.versions) else None

    def _rate(self, ref: ChoiceRef, user: str | None, approved: Vote) -> None:
        if (arm := self._arm_of.get(self._version(ref))) is not None:
            self._replace(ref.completion_id, (ref.choice_index, user), approved, arm.revote)

    def _choose(self, feedback: PairwiseFeedback, user: str | None) -> None:
        versions = [self._version(feedback.a), self._version(feedback.b)]
        if set(versions) != set(self._arm_of):  # one canary answer and one baseline answer
            return
        canary_won = None if feedback.preference == "tie" else \
            versions[0 if feedback.preference == "a" else 1] == self._canary
        pair = tuple(sorted((ref.completion_id, ref.choice_index) for ref in (feedback.a, feedback.b)))
        self._replace(pair[0][0], (pair, user), canary_won, self.head_to_head.revote)

    def _replace(self, completion_id: str, key: tuple, vote: Vote, revote) -> None:
        """Make `vote` the one under `key`, kept with answer `completion_id`, and count the change."""
        votes = self._answers[completion_id].votes
        old = votes.pop(key, None)
        if vote is not None:
            votes[key] = vote
        revote(old, vote)
