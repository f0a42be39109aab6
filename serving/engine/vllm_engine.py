"""EngineClient on vLLM's in-process AsyncLLM, with runtime LoRA for policy versions."""

from __future__ import annotations

from collections.abc import AsyncIterator

import torch
from transformers import AutoTokenizer
from vllm import SamplingParams, TokensPrompt
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from common.registry import PolicyVersion
from common.vllm_cpu import prepare_cpu_engine
from serving.engine.protocol import ChoiceDelta, GenerationUpdate, SamplingOptions, TokenLogprob
from serving.settings import ServingSettings


def lora_request(policy: PolicyVersion) -> LoRARequest | None:
    # The version number doubles as vLLM's adapter id: unique, and stable across restarts.
    return None if policy.is_base else LoRARequest(policy.name, policy.number, str(policy.path))


class VllmEngine:
    def __init__(self, settings: ServingSettings):
        if not torch.cuda.is_available():
            prepare_cpu_engine(settings.kv_cache_gib)
        self.max_model_len = settings.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(settings.base_model)
        args = AsyncEngineArgs(
            model=str(settings.base_model),
            served_model_name=[settings.served_model_name],
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enable_lora=True,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.max_loras * 4,
        )
        self.llm = AsyncLLM.from_engine_args(args)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str, policy: PolicyVersion
    ) -> AsyncIterator[GenerationUpdate]:
        params = SamplingParams(
            n=options.n,
            temperature=options.temperature,
            top_p=options.top_p,
            max_tokens=options.max_tokens,
            seed=options.seed,
            stop=options.stop or None,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            logprobs=options.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids)
        async for output in self.llm.generate(prompt, params, request_id, lora_request=lora_request(policy)):
            yield GenerationUpdate(
                prompt_tokens=len(output.prompt_token_ids or prompt_token_ids),
                choices=[
                    ChoiceDelta(index=c.index, text=c.text, new_tokens=len(c.token_ids), finish_reason=c.finish_reason,
                                logprobs=None if options.logprobs is None else _token_logprobs(c, options.logprobs))
                    for c in output.outputs
                ],
            )

    async def load_policy(self, policy: PolicyVersion) -> None:
        if not policy.is_base:
            await self.llm.add_lora(lora_request(policy))

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()


def _token_logprobs(completion, top_n: int) -> list[TokenLogprob]:
    result = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or [], strict=False):
        chosen = position[token_id]
        ranked = sorted(position.values(), key=lambda lp: -lp.logprob)[:top_n]
        result.append(TokenLogprob(token=chosen.decoded_token or "", logprob=chosen.logprob,
                                   top=[(lp.decoded_token or "", lp.logprob) for lp in ranked]))
    return result
