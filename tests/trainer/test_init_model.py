"""The default base model: tokenizer, chat template, vLLM-compatible shape, and that it learned to answer.

Uses the session's tiny base model (tests/conftest.py builds it once and caches it).
"""

import dataclasses
import json
import os
import re

import jinja2
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.data.corpus import generate_dialogues, sample_prompts
from trainer.init_model import PRESETS, build_base_model, encode_dialogue

MAX_NEW_TOKENS = 64


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module")
def model(base_model_dir):
    return AutoModelForCausalLM.from_pretrained(base_model_dir).eval()


def _greedy(model, tokenizer, messages) -> list[int]:
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())  # numbers count as words: "2." is a fine answer


@pytest.mark.parametrize(
    "text", ["What is 3 plus 4?", "  two  spaces, tabs\tand\nnewlines ", "Grüße aus 北京 🙂"]
)
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_chat_markers_are_single_tokens(tokenizer):
    for marker in ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"):
        assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    assert (
        tokenizer.eos_token == "<|end|>"
        and tokenizer.bos_token == "<|bos|>"
        and tokenizer.pad_token == "<|pad|>"
    )


def test_chat_template_renders_every_role_and_the_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 1 plus 1?"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|bos|><|system|>Answer briefly.<|end|><|user|>Hi!<|end|><|assistant|>Hello!<|end|>"
        "<|user|>What is 1 plus 1?<|end|><|assistant|>"
    )
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>")
    with pytest.raises(jinja2.TemplateError, match="unsupported role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_training_encoding_is_the_chat_template_with_loss_on_answers_only(tokenizer):
    dialogue = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What colour is snow?"},
        {"role": "assistant", "content": "White."},
    ]
    ids, trained = encode_dialogue(tokenizer, dialogue)
    assert ids == tokenizer.apply_chat_template(dialogue, tokenize=True, return_dict=False)
    assert tokenizer.decode([i for i, t in zip(ids, trained, strict=True) if t]) == "White.<|end|>"


def test_config_fits_vllm_on_the_cpu(base_model_dir, model, tokenizer):
    config = json.loads((base_model_dir / "config.json").read_text())
    assert config["head_dim"] == 64 and config["hidden_size"] == 64 * config["num_attention_heads"]
    assert config["max_position_embeddings"] >= 512
    assert model.dtype == torch.float32
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert model.config.eos_token_id == end and model.generation_config.eos_token_id == end


def test_greedy_answers_stop_at_the_end_token_in_known_words(model, tokenizer):
    corpus_words = {w for d in generate_dialogues(3000, seed=0) for m in d for w in _words(m["content"])}
    prompts = [[{"role": "user", "content": q}] for q in ("What colour is grass?", "Tell me about dogs.")]
    prompts += sample_prompts(4, seed=1)
    for messages in prompts:
        generated = _greedy(model, tokenizer, messages)
        assert generated[-1] == tokenizer.eos_token_id, (
            f"no end token in {MAX_NEW_TOKENS} tokens: {generated}"
        )
        words = _words(tokenizer.decode(generated, skip_special_tokens=True))
        assert words and sum(w in corpus_words for w in words) >= 0.8 * len(words), (messages, words)


def test_greedy_answer_to_a_capital_question_names_the_capital(model, tokenizer):
    answer = tokenizer.decode(
        _greedy(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    )
    assert "Paris" in answer, answer


def test_build_is_deterministic_and_leaves_threads_as_they_were(tmp_path, monkeypatch):
    """A few steps of a miniature preset, twice: same seed, same bytes; the process settings come back."""
    micro = dataclasses.replace(PRESETS["tiny"], dialogues=200, steps=3, batch_size=4, vocab_size=400)
    monkeypatch.setitem(PRESETS, "micro", micro)
    threads, parallelism = torch.get_num_threads(), os.environ.get("TOKENIZERS_PARALLELISM")
    first = build_base_model(tmp_path / "a", preset="micro", seed=7)
    second = build_base_model(tmp_path / "b", preset="micro", seed=7)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert torch.get_num_threads() == threads and os.environ.get("TOKENIZERS_PARALLELISM") == parallelism
