"""Pydantic models of every event on the topics.

Serving produces `CompletionEvent` and `FeedbackEvent`; `PolicyEvent` comes from the trainer (a version
published) and from serving (its canary's verdict on one); each side parses the other's with these same
models. Every event carries `schema_version` so that consumers can
refuse what they do not understand instead of misreading it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

SCHEMA_VERSION = 1


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Message(_Model):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingRecord(_Model):
    """The sampling parameters a completion was generated with (enough to reproduce it)."""

    temperature: float
    top_p: float
    max_tokens: int
    n: int = 1
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionChoice(_Model):
    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    policy_version: str | None = None  # set when choices came from different versions (A/B); else the event's


class CompletionEvent(_Model):
    """One served chat completion: the prompt, every returned choice, and the policy that wrote them."""

    event_type: Literal["completion"] = "completion"
    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(default_factory=_new_id)
    created_at: datetime = Field(default_factory=_now)
    completion_id: str
    model: str
    policy_version: str
    messages: list[Message]
    choices: list[CompletionChoice]
    sampling: SamplingRecord
    prompt_tokens: int
    user_hash: str | None = None


# --- Feedback kinds -------------------------------------------------------------------------------


class ChoiceRef(_Model):
    """One answer: choice `choice_index` of completion `completion_id`."""

    completion_id: str = Field(min_length=1, max_length=128)
    choice_index: int = Field(default=0, ge=0)


class ThumbsFeedback(ChoiceRef):
    type: Literal["thumbs"]
    rating: Literal["up", "down"]


class RatingFeedback(ChoiceRef):
    """A 1-7 Likert score, the scale InstructGPT's labelers used."""

    type: Literal["rating"]
    score: int = Field(ge=1, le=7)


class CorrectionFeedback(ChoiceRef):
    """The answer the user wanted instead: a demonstration for supervised fine-tuning."""

    type: Literal["correction"]
    text: str = Field(min_length=1, max_length=32_000)


class PairwiseFeedback(_Model):
    type: Literal["pairwise"]
    a: ChoiceRef
    b: ChoiceRef
    preference: Literal["a", "b", "tie"]

    @model_validator(mode="after")
    def _distinct(self) -> PairwiseFeedback:
        if self.a == self.b:
            raise ValueError("'a' and 'b' must name two different answers")
        return self


class RankingFeedback(_Model):
    """Answers to one prompt ordered best first (K >= 2)."""

    type: Literal["ranking"]
    ranked: list[ChoiceRef] = Field(min_length=2, max_length=16)

    @model_validator(mode="after")
    def _distinct(self) -> RankingFeedback:
        if len(set(self.ranked)) != len(self.ranked):
            raise ValueError("'ranked' names the same answer twice")
        return self


Feedback = Annotated[
    ThumbsFeedback | RatingFeedback | CorrectionFeedback | PairwiseFeedback | RankingFeedback,
    Field(discriminator="type"),
]
_feedback_adapter: TypeAdapter[Feedback] = TypeAdapter(Feedback)


def parse_feedback(data: object) -> Feedback:
    return _feedback_adapter.validate_python(data)


def referenced_choices(feedback: Feedback) -> list[ChoiceRef]:
    """Every answer a piece of feedback talks about."""
    if isinstance(feedback, PairwiseFeedback):
        return [feedback.a, feedback.b]
    if isinstance(feedback, RankingFeedback):
        return list(feedback.ranked)
    return [ChoiceRef(completion_id=feedback.completion_id, choice_index=feedback.choice_index)]


class FeedbackEvent(_Model):
    event_type: Literal["feedback"] = "feedback"
    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(default_factory=_new_id)
    received_at: datetime = Field(default_factory=_now)
    feedback: Feedback
    user_hash: str | None = None


class PolicyEvent(_Model):
    """A policy version's news: published to the registry by the trainer, or promoted or rolled back by a
    serving replica's canary (so that every replica follows the verdict)."""

    event_type: Literal["policy"] = "policy"
    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(default_factory=_new_id)
    created_at: datetime = Field(default_factory=_now)
    version: str
    base_model: str
    action: Literal["published", "promoted", "rolled_back"] = "published"
    reason: str | None = None  # for a verdict: why, in words
    metrics: dict[str, float] = Field(default_factory=dict)
