"""PPO's rollouts: responses sampled from the current policy, by Hugging Face `generate` or by vLLM.

Both backends take prompts as token ids and return `n` responses per prompt (prompt-major), each as token
ids ending at, and including, a stop token (`stop_ids`: end-of-sequence, and any other the model's generation
config names) when the policy stopped by itself, and without one when it was cut at `max_new_tokens`
(`ended` tells which: vLLM's finish_reason "stop" against "length"). They sample
from the full distribution at the given temperature (no top-k, no top-p): PPO's probability ratios assume
the rollouts come from the policy it trains. Log-probabilities are never taken from the generator; PPO
recomputes them in torch.

Each prompt has a seed of its own (not one seed per batch), so a prompt's samples do not depend on what
else is in the batch: a data-parallel rank generating its shard of a batch gets the samples a single
process would get for those rows.

`refresh(policy)` is called before the first rollout and after every PPO update: the HF backend simply
samples from the live model; the vLLM backend either reloads its weights in place with the adapter merged
into them (sync="weights"), or saves the adapter and loads it under a new LoRA id, dropping the previous one
(sync="lora"). Measured on the CPU (small preset, 64 prompts x 32 tokens): vLLM's LoRA path took 0.59 s a
batch against 0.22 s without LoRA, hence merged weights by default there; the LoRA path writes only the
adapter, which is what scales to large models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Literal, Protocol

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
)

from common.vllm_cpu import prepare_cpu_engine
from trainer.distributed import full, is_sharded
from trainer.tokens import load_tokenizer, pad_left, stop_ids

# Ranks vLLM's LoRA kernels are built for; max_lora_rank must be one of them.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class RolloutBackend(Protocol):
    stop_ids: frozenset[int]  # the tokens at which it stops an answer

    def refresh(self, policy: PeftModel) -> None:
        """Sample from `policy`'s current weights from now on."""

    def generate(
        self,
        prompts: Sequence[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seeds: Sequence[int],
    ) -> list[list[int]]:
        """`n` responses for each prompt, prompt-major; `seeds` holds one seed per prompt."""

    def close(self) -> None: ...


def ended(response: list[int], stops: frozenset[int]) -> bool:
    """Whether the policy stopped this answer itself (False: it was cut at the length cap)."""
    return bool(response) and response[-1] in stops


def end_at_stop(tokens: list[int], stops: frozenset[int]) -> list[int]:
    """The tokens up to and including the first stop token (generate pads rows that stopped early)."""
    first = next((i for i, token in enumerate(tokens) if token in stops), None)
    return tokens if first is None else tokens[: first + 1]


class SeededSampler(LogitsProcessor):
    """Sampling by the Gumbel-max trick with one random stream per row, for HF's greedy decoding loop.

    argmax(logits / T + G) with G standard Gumbel noise is an exact sample of softmax(logits / T). The
    noise of row i comes from its own generator, one draw per decoding step, so a row's sample depends on
    its seed and its own tokens only. T = 0 is greedy decoding.
    """

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return scores
        uniform = torch.stack(
            [torch.rand(scores.shape[1], generator=g, dtype=torch.float64) for g in self.generators]
        ).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        return scores.float() / self.temperature + gumbel.float()


class HFRollout:
    """Rollouts by transformers' `generate` on the policy being trained: no copy, nothing to refresh."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.policy: PeftModel | None = None
        self.stop_ids = stop_ids(tokenizer, None)  # and the policy's generation config once refreshed

    def refresh(self, policy: PeftModel) -> None:
        self.policy = policy
        self.stop_ids = stop_ids(self.tokenizer, policy.generation_config)

    @torch.no_grad()
    def generate(self, prompts, n, max_new_tokens, temperature, seeds) -> list[list[int]]:
        rows = [prompt for prompt in prompts for _ in range(n)]
        # Row j of prompt i gets seed (seeds[i], j): n > 1 draws n different samples.
        row_seeds = [seed * 1_000_003 + j for seed in seeds for j in range(n)]
        input_ids, attention_mask = pad_left(rows, self.tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(self.policy.device), attention_mask.to(self.policy.device)
        greedy = GenerationConfig(
            do_sample=False,  # the sampling is SeededSampler's
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.stop_ids),  # where vLLM stops too
            pad_token_id=self.tokenizer.pad_token_id,
        )
        out = self.policy.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=greedy,
            logits_processor=LogitsProcessorList([SeededSampler(row_seeds, temperature)]),
            synced_gpus=is_sharded(self.policy),  # sharded ranks run every step's forward until all are done
        )
        return [end_at_stop(row, self.stop_ids) for row in out[:, input_ids.shape[1] :].tolist()]

    def close(self) -> None:
        self.policy = None


def merged_weights(policy: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's weights, named as in its checkpoint, with the policy adapter's update W += B A s
    added; the policy itself is left as it is (merging in place and back would drift in float32). Sharded
    weights are gathered whole: every rank of a sharded policy must call this."""
    model = policy.get_base_model()
    weights = {  # copies on the CPU, where vLLM reads them from: tied weights share memory
        name.replace(".base_layer.", "."): full(tensor).detach().to("cpu", copy=True)
        for name, tensor in model.state_dict().items()
        if "lora_" not in name
    }
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                weights[f"{name}.weight"] += module.get_delta_weight("default").cpu()
    return weights


@contextmanager
def engine_in_this_process() -> Iterator[None]:
    """Build a vLLM engine whose scheduler and model run in this process, leaving the process as it was.

    vLLM's default puts the scheduler in one process and the model in another, and every decoding step
    crosses both: on a 2-core CPU that hop cost as much as the model (64 rollouts of the small preset:
    150-170 samples/s against 250-310 in-process, one torch thread). Starting the engine reseeds the global RNGs and
    replaces `torch.set_num_threads` with a no-op (it guards vLLM's thread binding, which is off here):
    both are restored.
    """
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read during construction only
    set_num_threads = torch.set_num_threads
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads = set_num_threads
        if previous is None:
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


class VllmRollout:
    """Rollouts by a vLLM engine of the trainer's own, running the policy being trained.

    sync="weights": refresh writes the base weights with the adapter merged in and reloads them in place
    (the engine runs without LoRA); sync="lora": refresh saves the adapter and the engine applies it with
    its LoRA kernels. The engine starts in about 20 s (tiny model, CPU). On the CPU its KV cache takes
    VLLM_CPU_KVCACHE_SPACE GiB (1 unless set) and its worker is not pinned to cores
    (common.vllm_cpu); on a GPU it takes `gpu_memory_utilization` of the device,
    which the training step shares. On the CPU, outside a launcher, the engine runs in this process
    (`engine_in_this_process`) on its torch threads; under a launcher each rank's engine keeps a worker
    process of its own, whose torch.distributed world must not be the ranks' one. float32 keeps sampling
    close to the torch log-probabilities PPO recomputes. A process that builds one must guard its entry point with `if __name__ == "__main__":`
    (vLLM starts worker processes).
    """

    def __init__(self, base_model: Path, lora_rank: int, sync: Literal["weights", "lora"] = "weights",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.3):  # fmt: skip
        if not torch.cuda.is_available():
            prepare_cpu_engine(kv_cache_gib=1)
        from vllm import LLM  # imported here: the HF backend and the tests' fast path never load vLLM

        lora = {"enable_lora": True, "max_loras": 1,
                "max_lora_rank": min(r for r in VLLM_LORA_RANKS if r >= lora_rank)}  # fmt: skip
        unsplit_prefills = {}
        if not torch.cuda.is_available():
            # vLLM 0.32's CPU worker dies ("CPU Generator does not use offset") when it splits the prefill
            # of a seeded request across steps, and every rollout is seeded: prefills stay whole.
            context = max_model_len or AutoConfig.from_pretrained(base_model).max_position_embeddings
            unsplit_prefills = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(8192, context)}
        self.in_process = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) == 1
        with engine_in_this_process() if self.in_process else nullcontext():
            self.llm = LLM(
                model=str(base_model),
                dtype="float32",
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                **(lora if sync == "lora" else {}),
                **unsplit_prefills,
            )
        self.sync = sync
        try:  # vLLM stops at the generation config's eos_token_id too
            generation = GenerationConfig.from_pretrained(base_model)
        except OSError:  # the model has none
            generation = None
        self.stop_ids = stop_ids(load_tokenizer(base_model), generation)
        self.work = Path(tempfile.mkdtemp(prefix="vllm-rollout-"))
        self.refreshes = 0
        self.lora = None  # sync="lora": the LoRARequest of the current adapter

    def refresh(self, policy: PeftModel) -> None:
        from vllm.lora.request import LoRARequest

        self.refreshes += 1
        path = self.work / f"v{self.refreshes}"
        if self.sync == "weights":
            path.mkdir()
            save_file(merged_weights(policy), path / "model.safetensors")
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            # The prefix cache keeps KV computed by the old weights, keyed by tokens alone: a prompt seen
            # before would be continued from the old policy's prefix. (LoRA ids are part of the key.)
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vLLM did not reset its prefix cache after the weight reload")
            shutil.rmtree(path)
            return
        policy.save_pretrained(path, selected_adapters=["default"])
        previous, self.lora = self.lora, LoRARequest(f"policy-v{self.refreshes}", self.refreshes, str(path))
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def generate(self, prompts, n, max_new_tokens, temperature, seeds) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                max_tokens=max_new_tokens,
                seed=seed,
                detokenize=False,  # PPO decodes what it scores itself
            )
            for seed in seeds
        ]
        # In this process, vLLM's sampler also draws from the global RNG: keep the trainer's stream its own.
        with torch.random.fork_rng(devices=[]) if self.in_process else nullcontext():
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                params,
                lora_request=self.lora,
                use_tqdm=False,
            )
        # vLLM ends an answer at its first stop token, which it keeps: nothing to cut.
        return [list(c.token_ids) for o in outputs for c in o.outputs]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        if self.in_process:  # the engine's torch.distributed world of one lives in this process
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        shutil.rmtree(self.work, ignore_errors=True)
