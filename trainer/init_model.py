"""Build the project's default base model with no download: a byte-level BPE tokenizer and a small Llama,
both trained from scratch on the templated dialogues of trainer.data.corpus.

The result is a plain Hugging Face directory (float32 safetensors, tokenizer files with a chat template,
generation config) that transformers' Auto classes and vLLM both load, and that PEFT LoRA adapters on
q/k/v/o_proj attach to. `tiny` is for the test suite (well under a minute on 2 cores), `small` for
`make up` (a few minutes).

Chat format, one token per marker so the template and the training encoder cannot disagree on splits:
    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>
<|end|> closes every turn and is the eos token, so generation stops after one answer.

The loss is on the assistant turns only (their closing <|end|> included). The user turns are random
draws from the tables (which country, which numbers), so predicting them teaches nothing the model will
use, and a model this small cannot spare the capacity: trained on all tokens, the tiny preset answered
"What is the capital of France?" with "The capital of Chile is Santiago."
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from trainer.data.corpus import Dialogue, generate_dialogues

log = logging.getLogger(__name__)

Example = tuple[list[int], list[bool]]  # token ids of one dialogue, and which of them the loss is on

BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [PAD, BOS, END, *(f"<|{role}|>" for role in ROLES)]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

HEAD_DIM = 64  # vLLM's CPU attention refuses small head sizes such as 16; 64 is supported everywhere


@dataclass(frozen=True)
class Preset:
    """Model shape and training budget of one base-model size."""

    hidden_size: int  # residual width; hidden_size / num_heads must equal HEAD_DIM
    num_layers: int  # transformer blocks
    num_heads: int  # attention heads (no grouped-query attention: kv heads = heads)
    intermediate_size: int  # SwiGLU MLP width
    vocab_size: int  # BPE vocabulary cap incl. special tokens; merges run out near 1.5k on this corpus
    max_position_embeddings: int  # longest sequence the model (and vLLM's max_model_len) can use
    dialogues: int  # corpus size (tokenizer and model train on the same); steps * batch_size = one pass
    steps: int  # optimizer steps; fixed rather than timed so that a seed gives the same weights
    batch_size: int  # dialogues per step
    learning_rate: float  # AdamW peak, reached after warmup_steps, then cosine decay to a tenth
    warmup_steps: int


PRESETS = {
    # About 20 s of CPU (one thread), loss ~0.71: built once per test session.
    "tiny": Preset(
        hidden_size=128, num_layers=2, num_heads=2, intermediate_size=384, vocab_size=1024,
        max_position_embeddings=512, dialogues=8000, steps=500, batch_size=16,
        learning_rate=6e-3, warmup_steps=30,
    ),
    # About 3 minutes of CPU (one thread), loss ~0.48: the default model of `make up`.
    "small": Preset(
        hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768, vocab_size=2048,
        max_position_embeddings=512, dialogues=16000, steps=1000, batch_size=16,
        learning_rate=2e-3, warmup_steps=50,
    ),
}  # fmt: skip

LOG_EVERY = 50  # steps between loss lines
BUCKET_BATCHES = 16  # batches per length-sorted window in _batches


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (any text round-trips, no unknown token) with the chat markers as single tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        # Keep decode(encode(text)) == text: the default clean-up would glue " ," and " ." together.
        clean_up_tokenization_spaces=False,
    )


def encode_dialogue(tokenizer: PreTrainedTokenizerFast, dialogue: Dialogue) -> Example:
    """Token ids of the chat-templated dialogue, and which of them the loss is on (assistant turns)."""
    ids = [tokenizer.convert_tokens_to_ids(BOS)]
    trained = [False]
    end = tokenizer.convert_tokens_to_ids(END)
    for message in dialogue:
        content = tokenizer.encode(message["content"], add_special_tokens=False)
        ids += [tokenizer.convert_tokens_to_ids(f"<|{message['role']}|>"), *content, end]
        is_answer = message["role"] == "assistant"
        trained += [False] + [is_answer] * (len(content) + 1)  # the closing <|end|> teaches when to stop
    return ids, trained


def _batches(
    examples: list[Example], batch_size: int, pad_id: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches of (input_ids, labels), right-padded to the longest in the batch.

    Dialogues range from ~10 to ~150 tokens, so each window of BUCKET_BATCHES batches is sorted by
    length before it is cut: that more than halves the padding the CPU would otherwise compute on.
    Right padding needs no attention mask under causal attention: real tokens never look ahead at
    the pads, and pads carry label -100. That keeps SDPA on its fast causal path.
    """
    generator = torch.Generator().manual_seed(seed)
    window = batch_size * BUCKET_BATCHES
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        batches = []
        for start in range(0, len(order) - window + 1, window):
            bucket = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
            batches += [bucket[i : i + batch_size] for i in range(0, window, batch_size)]
        for index in torch.randperm(len(batches), generator=generator).tolist():
            batch = [examples[i] for i in batches[index]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id)
            labels = torch.full((len(batch), width), -100)
            for row, (ids, trained) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, : len(ids)] = torch.where(torch.tensor(trained), torch.tensor(ids), -100)
            yield input_ids, labels


def _learning_rate(step: int, preset: Preset) -> float:
    if step < preset.warmup_steps:
        return preset.learning_rate * (step + 1) / preset.warmup_steps
    progress = (step - preset.warmup_steps) / max(1, preset.steps - preset.warmup_steps)
    return preset.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextmanager
def _single_threaded():
    """One CPU thread for the tokenizer trainer and for torch, restored afterwards (tests share the process).

    Determinism: the BPE trainer, counting in parallel, breaks ties between equally frequent merges
    differently from run to run. Speed: these matrices are too small to gain much from a second thread
    (1.7x on an idle 2-core machine), and while another process kept the shared cores busy, two torch
    threads waiting on each other made the tiny build 5-6x slower than one thread did.
    """
    threads, parallelism = torch.get_num_threads(), os.environ.get("TOKENIZERS_PARALLELISM")
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the tokenizers library at each call
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if parallelism is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def _prepare_corpus(config: Preset, seed: int) -> tuple[PreTrainedTokenizerFast, list[Example]]:
    """The trained tokenizer and the encoded dialogues."""
    dialogues = generate_dialogues(config.dialogues, seed)
    tokenizer = train_tokenizer([m["content"] for d in dialogues for m in d], config.vocab_size)
    tokenizer.model_max_length = config.max_position_embeddings
    examples = [encode_dialogue(tokenizer, d) for d in dialogues]
    # The loss mask assumes the chat template's layout; fail loudly if the two ever drift apart.
    for dialogue, (ids, _) in zip(dialogues[:20], examples, strict=False):
        assert tokenizer.apply_chat_template(dialogue, tokenize=True, return_dict=False) == ids, dialogue
    longest = max(len(ids) for ids, _ in examples)
    assert longest <= config.max_position_embeddings, f"a dialogue has {longest} tokens"
    return tokenizer, examples


def _new_model(config: Preset, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    assert config.hidden_size == config.num_heads * HEAD_DIM, "vLLM on the CPU needs head_dim 64"
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            head_dim=HEAD_DIM,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=True,  # the embedding is a large share of the parameters at this size
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # <|end|>: stop after one answer
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def _pretrain(
    model: LlamaForCausalLM, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], config: Preset
) -> float:
    """AdamW on the answer tokens for config.steps batches; returns the mean loss of the last LOG_EVERY."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    started = time.monotonic()
    recent: list[float] = []
    model.train()
    for step in range(1, config.steps + 1):
        input_ids, labels = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step - 1, config)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recent = [*recent[-(LOG_EVERY - 1) :], loss.item()]
        if step % LOG_EVERY == 0 or step == config.steps:
            mean = sum(recent) / len(recent)
            log.info("step %d/%d: loss %.3f (%.0fs)", step, config.steps, mean, time.monotonic() - started)
    model.eval()
    return sum(recent) / len(recent)


def build_base_model(out_dir: Path, preset: str = "small", seed: int = 0) -> Path:
    """Train tokenizer and model for `preset` from `seed` and save both into `out_dir`; returns it."""
    config = PRESETS[preset]
    out_dir = Path(out_dir)
    started = time.monotonic()
    with _single_threaded():
        tokenizer, examples = _prepare_corpus(config, seed)
        log.info(
            "%s corpus: %d dialogues, %d tokens, vocabulary %d",
            preset, len(examples), sum(len(ids) for ids, _ in examples), len(tokenizer),
        )  # fmt: skip
        torch.manual_seed(seed)
        model = _new_model(config, tokenizer)
        batches = _batches(examples, config.batch_size, tokenizer.pad_token_id, seed)
        loss = _pretrain(model, batches, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # float32 safetensors, config.json, generation_config.json
    tokenizer.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    log.info(
        "saved the %s base model (%d parameters, final loss %.3f) to %s in %.0fs",
        preset, model.num_parameters(), loss, out_dir, time.monotonic() - started,
    )  # fmt: skip
    return out_dir


def main(out: str | Path, preset: str = "small", seed: int = 0) -> None:
    """`python -m trainer init-model`."""
    build_base_model(Path(out), preset=preset, seed=seed)
