"""Chat completions with OpenAI semantics on top of an EngineClient (vLLM's OpenAIServingChat, small).

One request: validate against the model's limits -> pick the policy version -> generate -> shape the
response (whole, or as SSE chunks) -> log the completion event. The event goes out only for completions
that finished: an aborted stream is not something a user can give feedback on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common.registry import PolicyVersion
from feedback import CompletionChoice, CompletionEvent, Message, SamplingRecord
from serving import metrics
from serving.completion_ids import CompletionIds
from serving.engine import EngineClient, GenerationUpdate, SamplingOptions
from serving.engine import TokenLogprob as EngineTokenLogprob
from serving.errors import bad_request
from serving.event_log import EventSink
from serving.policy import PolicyManager
from serving.protocol import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
)


@dataclass
class PreparedChat:
    """A validated request, bound to one policy version for its whole life."""

    completion_id: str
    created: int
    model: str
    policy: PolicyVersion
    messages: list[dict[str, str]]
    prompt_token_ids: list[int]
    options: SamplingOptions
    user_hash: str | None
    evidence: bool  # routed by serving, not pinned nor an operator's: counts for the canary (its id says so)
    versions: list[str]  # the version that writes each choice (signed into the completion id)
    ab_policies: list[PolicyVersion] | None = None  # A/B: choice i comes from ab_policies[i]


def hash_user(user: str | None) -> str | None:
    # End-user ids never reach the logs in the clear.
    return hashlib.sha256(user.encode()).hexdigest()[:32] if user else None


def openai_logprobs(logprobs: list[EngineTokenLogprob] | None) -> ChoiceLogprobs | None:
    if logprobs is None:
        return None
    return ChoiceLogprobs(content=[
        TokenLogprob(token=lp.token, logprob=lp.logprob, bytes=list(lp.token.encode()),
                     top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in lp.top])
        for lp in logprobs
    ])


class ChatService:
    def __init__(self, engine: EngineClient, policies: PolicyManager, events: EventSink, ids: CompletionIds,
                 max_n: int):
        self._engine = engine
        self._policies = policies
        self._events = events
        self._ids = ids
        self._max_n = max_n

    def prepare(self, request: ChatCompletionRequest, operator: bool = False) -> PreparedChat:
        """Check the request against this server's limits; raise APIError (4xx) on any violation.
        `operator`: sent with the admin key, so no evidence about a canary."""
        if request.n > self._max_n:
            raise bad_request(f"n must be at most {self._max_n}", param="n")
        user_hash = hash_user(request.user)
        policy = self._policies.resolve(request.model, user_hash)
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt_token_ids = self._engine.render_chat(messages)
        room = self._engine.max_model_len - len(prompt_token_ids)
        max_tokens = request.requested_max_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise bad_request(
                f"this model's context is {self._engine.max_model_len} tokens; the messages take "
                f"{len(prompt_token_ids)} and {max_tokens or 1} more were asked for",
                param="messages" if room < 1 else "max_tokens",
            )
        ab_policies = None
        if request.ab:
            ab_policies = self._policies.ab_pair(policy)
            random.shuffle(ab_policies)  # no position bias: "A" is not always the current version
        options = SamplingOptions(
            max_tokens=max_tokens or room,
            temperature=request.temperature,
            top_p=request.top_p,
            n=2 if request.ab else request.n,
            seed=request.seed,
            stop=request.stop,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logprobs=(request.top_logprobs or 0) if request.logprobs else None,
        )
        versions = [p.name for p in ab_policies] if ab_policies else [policy.name] * options.n
        created = int(time.time())
        evidence = not operator and self._policies.routes(request.model)
        return PreparedChat(
            completion_id=self._ids.issue(versions, created, routed=evidence),
            created=created,
            model=f"{self._policies.served_model_name}@{policy.name}",
            policy=policy,
            messages=messages,
            prompt_token_ids=prompt_token_ids,
            options=options,
            user_hash=user_hash,
            evidence=evidence,
            versions=versions,
            ab_policies=ab_policies,
        )

    async def complete(self, chat: PreparedChat) -> ChatCompletionResponse:
        transcript = _Transcript(chat)
        async for update in self._generate(chat):
            transcript.add(update)
        self._finished(chat, transcript)
        return ChatCompletionResponse(
            id=chat.completion_id,
            created=chat.created,
            model=chat.model,
            system_fingerprint=chat.policy.name,
            choices=[
                Choice(index=i, message=AssistantMessage(content=text), finish_reason=transcript.finish[i],
                       logprobs=openai_logprobs(transcript.logprobs[i]),
                       policy_version=chat.ab_policies[i].name if chat.ab_policies else None)
                for i, text in enumerate(transcript.texts)
            ],
            usage=transcript.usage(),
        )

    async def stream(self, chat: PreparedChat, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a role chunk per choice, content deltas, finish reasons, optional usage."""
        transcript = _Transcript(chat)

        def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(id=chat.completion_id, created=chat.created, model=chat.model,
                                       system_fingerprint=chat.policy.name, choices=choices, usage=usage)
            return f"data: {body.model_dump_json()}\n\n"

        # One choice per chunk, as OpenAI sends them: clients read chunk.choices[0].
        for i in range(chat.options.n):
            yield event([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        async for update in self._generate(chat):
            transcript.add(update)
            for d in update.choices:
                if d.text or d.finish_reason:
                    yield event([ChunkChoice(index=d.index, delta=Delta(content=d.text or None),
                                             finish_reason=d.finish_reason, logprobs=openai_logprobs(d.logprobs))])
        self._finished(chat, transcript)
        if include_usage:
            yield event([], transcript.usage())
        yield "data: [DONE]\n\n"

    async def _generate(self, chat: PreparedChat):
        started = time.perf_counter()
        first = True
        metrics.IN_FLIGHT.inc()
        if chat.ab_policies is None:
            updates = self._engine.generate(chat.prompt_token_ids, chat.options, chat.completion_id, chat.policy)
        else:
            one = dataclasses.replace(chat.options, n=1)
            updates = _merge([
                _as_choice(i, self._engine.generate(chat.prompt_token_ids, one, f"{chat.completion_id}-{i}", policy))
                for i, policy in enumerate(chat.ab_policies)
            ])
        try:
            async for update in updates:
                if first and any(d.text for d in update.choices):
                    metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - started)
                    first = False
                yield update
        except Exception:
            self._observe(chat, failed=True)  # evidence for the canary; the error still reaches the client
            raise
        finally:
            metrics.IN_FLIGHT.dec()

    def _observe(self, chat: PreparedChat, failed: bool) -> None:
        if chat.evidence:
            self._policies.observe_request(chat.versions, failed)

    def _finished(self, chat: PreparedChat, transcript: _Transcript) -> None:
        metrics.GENERATED_TOKENS.labels(chat.policy.name).inc(sum(transcript.tokens))
        self._observe(chat, failed=False)
        o = chat.options
        self._events.log_completion(
            CompletionEvent(
                completion_id=chat.completion_id,
                model=self._policies.served_model_name,
                policy_version=chat.policy.name,
                messages=[Message(**m) for m in chat.messages],
                choices=[
                    CompletionChoice(index=i, text=text, finish_reason=transcript.finish[i],
                                     completion_tokens=transcript.tokens[i],
                                     policy_version=chat.ab_policies[i].name if chat.ab_policies else None)
                    for i, text in enumerate(transcript.texts)
                ],
                sampling=SamplingRecord(temperature=o.temperature, top_p=o.top_p, max_tokens=o.max_tokens, n=o.n,
                                        seed=o.seed, stop=o.stop, presence_penalty=o.presence_penalty,
                                        frequency_penalty=o.frequency_penalty),
                prompt_tokens=transcript.prompt_tokens,
                user_hash=chat.user_hash,
            )
        )


async def _as_choice(index: int, updates: AsyncIterator[GenerationUpdate]) -> AsyncIterator[GenerationUpdate]:
    """A single-choice stream renumbered as choice `index`."""
    async for update in updates:
        yield GenerationUpdate(update.prompt_tokens,
                               [dataclasses.replace(d, index=index) for d in update.choices])


async def _merge(streams: list[AsyncIterator[GenerationUpdate]]) -> AsyncIterator[GenerationUpdate]:
    """Updates of several streams as they come; closing the merge cancels (so aborts) every stream."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for update in stream:
                await queue.put(update)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


class _Transcript:
    """The choices of one request as they grow, from engine deltas."""

    def __init__(self, chat: PreparedChat):
        n = chat.options.n
        self.texts, self.tokens = [""] * n, [0] * n
        self.finish: list[str | None] = [None] * n
        self.logprobs: list[list[EngineTokenLogprob] | None] = [None] * n
        self.prompt_tokens = len(chat.prompt_token_ids)

    def add(self, update: GenerationUpdate) -> None:
        self.prompt_tokens = update.prompt_tokens
        for delta in update.choices:
            self.texts[delta.index] += delta.text
            self.tokens[delta.index] += delta.new_tokens
            self.finish[delta.index] = delta.finish_reason or self.finish[delta.index]
            if delta.logprobs is not None:
                self.logprobs[delta.index] = (self.logprobs[delta.index] or []) + delta.logprobs

    def usage(self) -> Usage:
        completion = sum(self.tokens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)
