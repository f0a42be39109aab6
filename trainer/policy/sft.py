"""Supervised fine-tuning, InstructGPT's first step: a LoRA adapter trained on demonstrations.

Demonstrations are prompts with the answer a person wrote: users' corrections from the feedback store,
and JSON-lines files of {"prompt": ..., "answer": ...} (trainer.data.load_demonstrations). The loss is the
next-token negative log-likelihood of the answer and its closing end-of-sequence token; the prompt is only
context, as when the base model learned to chat. The saved adapter is the SFT policy: PPO starts from it
and keeps it as its reference (trainer.policy.ppo, `reference_adapter`).

Runs data-parallel under torchrun like PPO (trainer.distributed): every rank draws the same batches and
computes its share of the rows, weighted by its share of the batch's answer tokens.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from trainer.adapters import ATTENTION_PROJECTIONS, lora_config
from trainer.data import Demonstration
from trainer.distributed import init as init_distributed
from trainer.distributed import training_device, weights_on_rank
from trainer.tokens import load_tokenizer, pad_right, prompt_ids, response_ids

log = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    # Passes over the demonstrations. InstructGPT trained 16 epochs and picked the checkpoint by reward
    # model score; corrections arrive a few at a time here, so a few passes.
    epochs: int = 3
    # Demonstrations per optimizer step.
    batch_size: int = 8
    # AdamW learning rate. InstructGPT fine-tuned all weights at ~1e-5; a rank-8 LoRA needs far larger
    # steps (as for the reward model and PPO here).
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Longest (prompt + answer) in tokens; a longer one loses the beginning of its prompt.
    max_length: int = 512
    # LoRA on the attention projections, the shape vLLM serves and PPO continues.
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ATTENTION_PROJECTIONS
    # Seeds the adapter initialisation and the shuffling.
    seed: int = 0


def encode(tokenizer, demonstration: Demonstration, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer, and labels: the answer's ids, -100 (no loss) on the prompt."""
    prompt = prompt_ids(tokenizer, demonstration.prompt)
    answer = response_ids(tokenizer, demonstration.response)
    ids = (prompt + answer)[-max_length:]
    labels = ([-100] * len(prompt) + answer)[-max_length:]
    return ids, labels


def train_sft(
    base_model: Path,
    demonstrations: list[Demonstration],
    out_adapter_dir: Path,
    config: SFTConfig,
    on_step: Callable[[dict], None] | None = None,
) -> dict[str, float]:
    """Train a LoRA adapter on `demonstrations`, save it to `out_adapter_dir`, return its metrics."""
    if not demonstrations:
        raise ValueError("SFT needs at least one demonstration")
    world = init_distributed()
    if config.batch_size < world.size:
        raise ValueError(f"batch_size must be at least the world size {world.size}")
    started = time.monotonic()
    tokenizer = load_tokenizer(Path(base_model))
    examples = [encode(tokenizer, d, config.max_length) for d in demonstrations]
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).to(training_device())
    torch.manual_seed(config.seed)
    lora = lora_config(config, task_type="CAUSAL_LM")
    policy = world.fully_shard(get_peft_model(model, lora).train())
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    order = list(range(len(examples)))
    step = 0

    for epoch in range(1, config.epochs + 1):
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), config.batch_size):
            step_started = time.monotonic()
            # This rank's rows of the batch; its loss is weighted by its share of the answer tokens.
            batch = order[start : start + config.batch_size]
            own = world.shard(batch)
            answer_tokens = [sum(label != -100 for label in examples[i][1][1:]) for i in batch]
            share = sum(answer_tokens[world.rank :: world.size]) / sum(answer_tokens)
            if not own:  # a last, short batch can leave a rank without rows: it runs one weighted zero
                own, share = batch[:1], 0.0  # (every rank runs the same forwards: FSDP needs that)
            ids, mask = pad_right([examples[i][0] for i in own], tokenizer.pad_token_id)
            labels, _ = pad_right([examples[i][1] for i in own], -100)
            ids, mask, labels = ids.to(policy.device), mask.to(policy.device), labels.to(policy.device)
            loss = share * policy(input_ids=ids, attention_mask=mask, labels=labels).loss

            # Step: gradients summed over the ranks, clipped, applied.
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            world.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()

            step += 1
            batch_loss = world.sum(loss.detach()).item()
            losses.append(batch_loss)
            seconds = time.monotonic() - step_started
            metrics = {"step": float(step), "epoch": float(epoch), "loss": batch_loss,
                       "tokens_per_s": sum(answer_tokens) / seconds}  # fmt: skip
            if on_step is not None:
                on_step(metrics)
        log.info("sft epoch %d/%d: loss %.4f", epoch, config.epochs, sum(losses) / len(losses))

    if world.is_main:
        policy.save_pretrained(out_adapter_dir)
    world.barrier()
    return {
        "train_loss": sum(losses) / len(losses),  # mean over the last epoch
        "demonstrations": float(len(demonstrations)),
        "steps": float(step),
        "weights_on_rank": weights_on_rank(policy),
        "seconds": time.monotonic() - started,
    }
