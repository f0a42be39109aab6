"""Pydantic models of every event on the topics.

Serving produces `CompletionEvent` and `FeedbackEvent`; `PolicyEvent` comes from the trainer (a version
published) and from serving (its canary's verdict on one); each side parses the other's with these same
models.

Schema versions: every event carries `schema_version`. A new version only adds optional fields, so a
record of an older version parses as the current one with the new fields at their defaults; a record of a
newer version than this code knows is refused (it may say what this consumer would misread), which sends
it to the dead-letter topic (common/dead_letters.py) instead of into training. Feedback is at version 2
(v2 added `comment`, `source`, `metadata`, pairwise `both_bad` and `shown_first`, and the event's
`app_key_id`); policy events at version 2 (v2 added `signature`); completions at version 1.

Policy events are signed: `signature` is an HMAC-SHA256 over the rest of the event (its canonical JSON)
under a key the trainer and serving share (common/keys.py). Serving acts only on events signed by that key
(serving/policy.py), so a producer with write access to the topic but not the key changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

METADATA_MAX_BYTES = 2048
COMMENT_MAX_CHARS = 4000


class _RandomIds:
    """Random version-4 UUIDs (hex) from os.urandom, read 4 KiB at a time. uuid4() reads 16 bytes per id,
    and that system call releases the GIL: under load every event id handed the interpreter to the Kafka
    sender threads for up to a switch interval (half of the feedback path's time in a profile)."""

    _CHUNK = 4096

    def __init__(self):
        self._lock = threading.Lock()
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child must not repeat its parent's ids

    def _reset(self) -> None:
        self._buffer, self._used = b"", 0

    def next(self) -> str:
        with self._lock:
            if self._used == len(self._buffer):
                self._buffer, self._used = os.urandom(self._CHUNK), 0
            raw = self._buffer[self._used : self._used + 16]
            self._used += 16
        return uuid.UUID(bytes=raw, version=4).hex


_new_id = _RandomIds().next


def _now() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Event(_Model):
    """A record on a topic, refused when written under a newer schema than its class's `SCHEMA_VERSION`."""

    SCHEMA_VERSION: ClassVar[int]

    @model_validator(mode="after")
    def _known_schema(self) -> _Event:
        if self.schema_version > self.SCHEMA_VERSION:  # type: ignore[attr-defined]
            raise ValueError(f"schema_version {self.schema_version} is newer than this reader's "
                             f"{self.SCHEMA_VERSION} for {self.__class__.__name__}")
        return self


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


class CompletionEvent(_Event):
    """One served chat completion: the prompt, every returned choice, and the policy that wrote them."""

    SCHEMA_VERSION: ClassVar[int] = 1
    event_type: Literal["completion"] = "completion"
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
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

Scalar = str | int | float | bool | None


class _Annotations(_Model):
    """What feedback tools record beside the judgment (Langfuse scores, LangSmith feedback): optional."""

    comment: str | None = Field(None, max_length=COMMENT_MAX_CHARS, description="The user's words, if any.")
    source: Literal["end_user", "app", "operator"] = Field(
        "end_user", description="Who judged: the end user, the app itself (e.g. an automatic check), or an "
        "operator (a labeller).")
    metadata: dict[str, Scalar] = Field(
        default_factory=dict, description=f"Free key/value pairs (scalars), at most {METADATA_MAX_BYTES} "
        "bytes as JSON: the app's own context (screen, experiment, ...).")

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, metadata: dict[str, Scalar]) -> dict[str, Scalar]:
        if metadata and len(json.dumps(metadata).encode()) > METADATA_MAX_BYTES:
            raise ValueError(f"metadata takes at most {METADATA_MAX_BYTES} bytes as JSON")
        return metadata

    def __hash__(self) -> int:  # frozen models hash their fields, and a dict (metadata) has no hash
        return hash((type(self), self.model_dump_json()))


class ChoiceRef(_Model):
    """One answer: choice `choice_index` of completion `completion_id`."""

    completion_id: str = Field(min_length=1, max_length=128)
    choice_index: int = Field(default=0, ge=0)


class ThumbsFeedback(_Annotations, ChoiceRef):
    type: Literal["thumbs"]
    rating: Literal["up", "down"]


class RatingFeedback(_Annotations, ChoiceRef):
    """A 1-7 Likert score, the scale InstructGPT's labelers used."""

    type: Literal["rating"]
    score: int = Field(ge=1, le=7)


class CorrectionFeedback(_Annotations, ChoiceRef):
    """The answer the user wanted instead: a demonstration for supervised fine-tuning."""

    type: Literal["correction"]
    text: str = Field(min_length=1, max_length=32_000)


class PairwiseFeedback(_Annotations):
    """A choice between two answers; Chatbot Arena's four votes are a, b, tie and tie with `both_bad`."""

    type: Literal["pairwise"]
    a: ChoiceRef
    b: ChoiceRef
    preference: Literal["a", "b", "tie"]
    both_bad: bool = Field(False, description="With preference 'tie': neither answer is good.")
    shown_first: Literal["a", "b"] | None = Field(
        None, description="Which answer the user saw first (left or top): to measure position bias.")

    @model_validator(mode="after")
    def _consistent(self) -> PairwiseFeedback:
        if self.a == self.b:
            raise ValueError("'a' and 'b' must name two different answers")
        if self.both_bad and self.preference != "tie":
            raise ValueError("'both_bad' goes with preference 'tie'")
        return self


class RankingFeedback(_Annotations):
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


class FeedbackEvent(_Event):
    """One piece of feedback as serving accepted it, attributed to the app key and the (hashed) end user.

    `event_id` is random, or derived from the client's idempotency key (`idempotent_event_id`): a retry
    accepted by another replica then carries the same id, and the trainer stores one of the two."""

    SCHEMA_VERSION: ClassVar[int] = 2
    event_type: Literal["feedback"] = "feedback"
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    event_id: str = Field(default_factory=_new_id)
    received_at: datetime = Field(default_factory=_now)
    feedback: Feedback
    user_hash: str | None = None  # the request's `user`, hashed as for completions
    app_key_id: str | None = None  # which app key sent it (a digest of the key, never the key)


def idempotent_event_id(app_key_id: str | None, idempotency_key: str) -> str:
    """The event id of feedback sent with an idempotency key: the same on every replica, and scoped to the
    app key, so that two apps choosing the same key never collide (Stripe's rule)."""
    return hashlib.sha256(f"{app_key_id or ''}\0{idempotency_key}".encode()).hexdigest()[:32]


class PolicyEvent(_Event):
    """A policy version's news: published to the registry by the trainer, or promoted or rolled back by a
    serving replica's canary (so that every replica follows the verdict)."""

    SCHEMA_VERSION: ClassVar[int] = 2
    event_type: Literal["policy"] = "policy"
    schema_version: int = Field(SCHEMA_VERSION, ge=1)
    event_id: str = Field(default_factory=_new_id)
    created_at: datetime = Field(default_factory=_now)
    version: str
    base_model: str
    action: Literal["published", "promoted", "rolled_back"] = "published"
    reason: str | None = None  # for a verdict: why, in words
    metrics: dict[str, float] = Field(default_factory=dict)
    signature: str | None = None  # HMAC-SHA256 (hex) of everything else: see `signed`

    def signed(self, key: str) -> PolicyEvent:
        """This event with its signature under `key`."""
        return self.model_copy(update={"signature": self._mac(key)})

    def signed_by(self, keys: Sequence[str]) -> bool:
        """Whether the event carries a signature by one of `keys` over exactly its content."""
        if self.signature is None:
            return False
        # Every key compared in constant time: timing tells nothing about how much of a signature was right.
        return any([hmac.compare_digest(self.signature.encode(), self._mac(key).encode()) for key in keys])

    def _mac(self, key: str) -> str:
        # Over the parsed fields as canonical JSON, not the record's bytes: any spelling of the same event
        # verifies, and any change to a field does not.
        content = json.dumps(self.model_dump(mode="json", exclude={"signature"}), sort_keys=True, separators=(",", ":"))
        return hmac.new(key.encode(), f"policy-event\0{content}".encode(), hashlib.sha256).hexdigest()
