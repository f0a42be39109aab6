"""What the HTTP layer needs from an inference engine, and nothing of any engine's own types.

The vLLM implementation lives in vllm_engine.py; unit tests use a fake with the same shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from common.registry import PolicyVersion


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no log-probabilities; k: the sampled token's and the top k


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at this position, most likely first


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one choice since the previous update."""

    index: int
    text: str
    new_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for


@dataclass(frozen=True)
class GenerationUpdate:
    prompt_tokens: int
    choices: list[ChoiceDelta]


class EngineClient(Protocol):
    max_model_len: int

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids of a conversation, with the model's chat template and a generation prompt."""
        ...

    def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str, policy: PolicyVersion
    ) -> AsyncIterator[GenerationUpdate]:
        """Stream deltas until every choice has a finish_reason. Closing the iterator aborts the request."""
        ...

    async def load_policy(self, policy: PolicyVersion) -> None:
        """Make `policy` ready to serve, so that the first request on it pays no loading time."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        ...

    def shutdown(self) -> None: ...
