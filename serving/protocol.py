"""OpenAI-compatible request and response models, and the one error body every endpoint returns."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator

from feedback import (
    CorrectionFeedback,
    Feedback,
    PairwiseFeedback,
    RankingFeedback,
    RatingFeedback,
    ThumbsFeedback,
    parse_feedback,
)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# --- Requests -------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Fields of the OpenAI API this server does not implement are accepted and ignored, as OpenAI's
    # own SDKs send some of them by default.
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: list[str] = Field(default_factory=list, description="A string or up to 4 strings.")
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    ab: bool = Field(
        False,
        description="Extension: two answers side by side, from the current version and the candidate (without "
        "a candidate: the canary while one runs, else two samples of the current version), in random order; "
        "each choice names its version.",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else [] if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stops: list[str]) -> list[str]:
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if all(not m.text().strip() for m in self.messages):
            raise ValueError("every message is empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if self.ab and (self.n != 1 or self.stream):
            raise ValueError("'ab' returns two choices itself: it takes neither 'n' nor 'stream'")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- Responses ------------------------------------------------------------------------------------


def _is_none(value: object) -> bool:
    return value is None



class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    policy_version: str | None = Field(None, exclude_if=_is_none, description="Extension, A/B requests only.")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    # Like OpenAI's chunks: a delta carries only what changed.
    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rlhf-service"
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _ClientFields(BaseModel):
    """What a feedback request carries beside the feedback itself; neither is stored as sent."""

    user: str | None = Field(None, max_length=256, description="The end user, as `user` of a completion: "
                             "hashed before it is stored. Of one user's opinions on one answer the latest counts.")
    event_id: str | None = Field(None, min_length=1, max_length=128, description="An idempotency key (as the "
                                 "`Idempotency-Key` header): a retry with it gets the first answer, no second event.")


class ThumbsRequest(ThumbsFeedback, _ClientFields): ...


class RatingRequest(RatingFeedback, _ClientFields): ...


class CorrectionRequest(CorrectionFeedback, _ClientFields): ...


class PairwiseRequest(PairwiseFeedback, _ClientFields): ...


class RankingRequest(RankingFeedback, _ClientFields): ...


class FeedbackRequest(RootModel[Annotated[ThumbsRequest | RatingRequest | CorrectionRequest | PairwiseRequest
                                          | RankingRequest, Field(discriminator="type")]]):
    """One piece of feedback; its `type` picks the kind (see feedback/events.py)."""

    def feedback(self) -> Feedback:
        """The feedback as it is stored: without the client's fields."""
        return parse_feedback(self.root.model_dump(exclude={"user", "event_id"}))


MAX_BATCH = 100


class FeedbackBatchRequest(BaseModel):
    feedback: list[Any] = Field(min_length=1, max_length=MAX_BATCH, description=f"Up to {MAX_BATCH} pieces "
                                "of feedback, each as the body of POST /v1/feedback; each is checked on its own.")


class FeedbackAccepted(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    status: Literal["accepted"] = "accepted"


class BatchItemResult(BaseModel):
    index: int
    status: int = Field(description="202, or the status the item would have had alone (400, 404, 409, 429, ...).")
    id: str | None = Field(None, exclude_if=_is_none)
    error: ErrorInfo | None = Field(None, exclude_if=_is_none)
    retry_after: int | None = Field(None, exclude_if=_is_none, description="With 429: seconds to wait.")


class FeedbackBatchResult(BaseModel):
    object: Literal["list"] = "list"
    accepted: int
    data: list[BatchItemResult]
