"""What a canary trial counts as evidence, and how often: once per answer and user, the latest rating wins.

Requests and failures: each replica counts those it routed by the served model name (not pinned to a
version, not an operator's: serving/chat.py). Feedback: on any replica, whichever served the answer. The
answer's signed completion id (serving/completion_ids.py) says which version wrote each choice, whether
the request was routed, and when it was issued; feedback counts when the answer was routed, written by
the trial's baseline or canary, and issued since the trial started (wall clock, whole seconds). Feedback
on any other answer (a pinned request's, an operator's, one served before the trial) is no evidence.

A thumbs or a 1-7 rating on such an answer is its user's vote (the feedback event's `user_hash`; without
one, the answer has a single anonymous vote): 5-7 and thumbs up approve, 1-3 and thumbs down disapprove,
4 says neither and withdraws an earlier vote. A later vote of the same user on the same answer replaces
the earlier one. A pairwise choice between a canary answer and a baseline answer is likewise one vote per
pair of answers and user (a tie withdraws it). Rankings are left out: their K-choose-2 pairs are not
independent observations. The votes of the newest `memory` answers voted on are kept; once an answer's
votes are forgotten, a vote on it, or on any answer issued no later, is ignored, so no vote ever counts
twice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from feedback import Feedback, PairwiseFeedback, RatingFeedback, ThumbsFeedback
from serving.completion_ids import ServedAnswer

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
    issued_at: int  # unix seconds
    votes: dict[tuple, bool] = field(default_factory=dict)  # (what was judged, user) -> the latest vote


class Evidence:
    """The two arms' requests, failures and votes over one trial, which started at `since` (unix seconds)."""

    def __init__(self, baseline: str, canary: str, memory: int, since: float):
        self.arms = {"baseline": ArmStats(), "canary": ArmStats()}
        self.head_to_head = HeadToHead()
        self._arm_of = {baseline: self.arms["baseline"], canary: self.arms["canary"]}
        self._canary = canary
        self._since = math.floor(since)  # ids carry whole seconds
        self._answers: OrderedDict[str, _Answer] = OrderedDict()  # completion id -> its votes, oldest first
        self._memory = memory
        self._forgotten_until = -math.inf  # the newest issue time among answers whose votes were forgotten

    def observe_request(self, versions: Sequence[str], failed: bool) -> None:
        """A request this replica routed: `versions[i]` wrote (or failed to write) its choice i."""
        for version in set(versions):
            if arm := self._arm_of.get(version):
                arm.requests += 1
                arm.failures += failed

    def observe_feedback(self, feedback: Feedback, user: str | None, answers: Sequence[ServedAnswer]) -> None:
        """`answers`: what the verified ids say of the answers it names (referenced_choices' order)."""
        if isinstance(feedback, ThumbsFeedback | RatingFeedback):
            if (arm := self._arm_of.get(self._version(answers[0]))) is not None:
                self._replace(feedback.completion_id, answers[0].issued_at, (feedback.choice_index, user),
                              approval(feedback), arm.revote)
        elif isinstance(feedback, PairwiseFeedback):
            self._choose(feedback, user, answers)

    def _version(self, answer: ServedAnswer) -> str | None:
        """The version that wrote an answer when the answer is evidence in this trial, else None."""
        return answer.version if answer.routed and answer.issued_at >= self._since else None

    def _choose(self, feedback: PairwiseFeedback, user: str | None, answers: Sequence[ServedAnswer]) -> None:
        versions = [self._version(answer) for answer in answers]
        if set(versions) != set(self._arm_of):  # one canary answer and one baseline answer
            return
        canary_won = None if feedback.preference == "tie" else \
            versions[0 if feedback.preference == "a" else 1] == self._canary
        # Either way round the same pair: kept with the answer named by the smaller (id, choice).
        named = [(ref.completion_id, ref.choice_index) for ref in (feedback.a, feedback.b)]
        (first, answer), (second, _) = sorted(zip(named, answers, strict=True), key=lambda pair: pair[0])
        self._replace(first[0], answer.issued_at, ((first, second), user), canary_won,
                      self.head_to_head.revote)

    def _replace(self, completion_id: str, issued_at: int, key: tuple, vote: Vote, revote) -> None:
        """Make `vote` the one under `key`, kept with answer `completion_id`, and count the change."""
        answer = self._answers.get(completion_id)
        if answer is None:
            if issued_at <= self._forgotten_until:  # its earlier votes may be counted and forgotten
                return
            answer = self._answers[completion_id] = _Answer(issued_at)
            while len(self._answers) > self._memory:
                _, forgotten = self._answers.popitem(last=False)
                self._forgotten_until = max(self._forgotten_until, forgotten.issued_at)
        old = answer.votes.pop(key, None)
        if vote is not None:
            answer.votes[key] = vote
        revote(old, vote)
