"""A fake engine and event sink with the shapes of the real ones, for fast unit tests of the HTTP layer."""

from __future__ import annotations

import asyncio

from common.registry import PolicyVersion
from feedback import CompletionEvent, FeedbackEvent, PolicyEvent
from serving.engine import ChoiceDelta, GenerationUpdate, SamplingOptions, TokenLogprob
from serving.event_log import EventLogUnavailable


class FakeEngine:
    """Answers with the words of the last user message, one word per token, tagged by policy version."""

    def __init__(self, max_model_len: int = 64):
        self.max_model_len = max_model_len
        self.loaded: list[str] = []
        self.aborted: list[str] = []
        self.word_delay_s = 0.0
        self.failing_versions: set[str] = set()  # generation raises for these, as a broken adapter would

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        words = " ".join(f"{m['role']}: {m['content']}" for m in messages).split()
        return list(range(len(words) + 1))

    async def generate(self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str,
                       policy: PolicyVersion):
        if policy.name in self.failing_versions:
            raise RuntimeError(f"engine failure on {policy.name}")
        words = [f"[{policy.name}]"] + [f"w{i}" for i in range(1, options.max_tokens + 1)]
        try:
            for step in range(options.max_tokens):
                if self.word_delay_s:
                    await asyncio.sleep(self.word_delay_s)
                word = words[step]
                stopped = any(stop in word for stop in options.stop)
                last = stopped or step == options.max_tokens - 1
                reason = ("stop" if stopped else "length") if last else None
                logprobs = None
                if options.logprobs is not None:  # the word, then made-up runners-up, each less likely
                    top = [(word, -0.5)] + [(f"alt{k}", -1.0 - k) for k in range(options.logprobs)]
                    logprobs = [TokenLogprob(token=word, logprob=-0.5, top=top[: options.logprobs])]
                yield GenerationUpdate(
                    prompt_tokens=len(prompt_token_ids),
                    choices=[ChoiceDelta(index=i, text="" if stopped else word + " ", new_tokens=1,
                                         finish_reason=reason, logprobs=logprobs) for i in range(options.n)],
                )
                if last:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise

    async def load_policy(self, policy: PolicyVersion) -> None:
        self.loaded.append(policy.name)

    async def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        pass


class MemoryEventSink:
    def __init__(self):
        self.completions: list[CompletionEvent] = []
        self.feedback: list[FeedbackEvent] = []
        self.announced: list[PolicyEvent] = []
        self.available = True

    def log_completion(self, event: CompletionEvent) -> None:
        self.completions.append(event)

    async def record_feedback(self, event: FeedbackEvent) -> None:
        if not self.available:
            raise EventLogUnavailable("broker down")
        self.feedback.append(event)

    async def announce_policy(self, event: PolicyEvent) -> None:
        self.announced.append(event)

    def close(self) -> None:
        pass
