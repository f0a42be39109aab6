"""(prompt, response) -> token ids, the way the served model sees them.

The prompt is rendered with the base model's chat template and tokenized as text, as vLLM's chat endpoint
does; the response follows, closed by the end-of-sequence token the policy emits to stop, unless it was cut
at the length cap: a truncated answer is scored as the unfinished text it is, not as one that had ended.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from trainer.data import Prompt, prompt_to_messages


def load_tokenizer(base_model: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked, so any id will do
    return tokenizer


def stop_ids(tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig | None) -> frozenset[int]:
    """The tokens that end an answer: the tokenizer's end-of-sequence and every eos_token_id of the model's
    generation config (vLLM stops at all of them; chat models often list an end-of-turn token there)."""
    extra = generation.eos_token_id if generation is not None else None
    extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return frozenset([tokenizer.eos_token_id, *extra])


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    text = tokenizer.apply_chat_template(
        prompt_to_messages(prompt), add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False).input_ids


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str, ended: bool = True) -> list[int]:
    """The response's tokens, closed by end-of-sequence if it `ended` (False: cut at the length cap)."""
    closing = [tokenizer.eos_token_id] if ended else []
    return tokenizer(response, add_special_tokens=False).input_ids + closing


def sample_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: str, max_length: int, ended: bool = True
) -> list[int]:
    """Prompt and response; an over-long sample loses its beginning, since rewards are read at the end."""
    return (prompt_ids(tokenizer, prompt) + response_ids(tokenizer, response, ended))[-max_length:]


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both [len(seqs), longest]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both [len(seqs), longest], padded on the left (for generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask
