"""Supervised fine-tuning on demonstrations, and PPO with the SFT policy as its reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.trainer.preferences import is_polite
from trainer.data import Demonstration, load_demonstrations, prompt_from_messages
from trainer.data.corpus import generate_dialogues, sample_prompts
from trainer.policy.ppo import PPOConfig, load_policy, pack, policy_forward, reference_policy, train_ppo
from trainer.policy.rollout import HFRollout
from trainer.policy.sft import SFTConfig, train_sft
from trainer.tokens import load_tokenizer, prompt_ids


def polite_demonstrations(n: int, seed: int) -> list[Demonstration]:
    """Corpus answers, each made polite: what a user who corrects impolite answers would write."""
    return [
        Demonstration(
            prompt_from_messages(d[:-1]),
            d[-1]["content"] if is_polite(d[-1]["content"]) else d[-1]["content"] + " Thanks for asking!",
        )
        for d in generate_dialogues(n, seed)
    ]


@pytest.fixture(scope="module")
def sft_adapter(base_model_dir, tmp_path_factory) -> tuple[Path, list[dict], dict]:
    out = tmp_path_factory.mktemp("sft")
    history: list[dict] = []
    metrics = train_sft(base_model_dir, polite_demonstrations(200, seed=1), out, SFTConfig(), history.append)
    return out, history, metrics


def polite_rate(model, tokenizer, prompts) -> float:
    rollout = HFRollout(tokenizer)
    rollout.refresh(model)
    queries = [prompt_ids(tokenizer, p) for p in prompts]
    texts = [tokenizer.decode(r, skip_special_tokens=True)
             for r in rollout.generate(queries, 2, 48, 1.0, seeds=list(range(len(queries))))]  # fmt: skip
    return sum(map(is_polite, texts)) / len(texts)


def test_load_demonstrations_reads_string_and_chat_prompts(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text(
        json.dumps({"prompt": "Hi!", "answer": "Hello!"}) + "\n\n"
        + json.dumps({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
                      "answer": "4."}) + "\n"
    )  # fmt: skip
    assert load_demonstrations(path) == [
        Demonstration((("user", "Hi!"),), "Hello!"),
        Demonstration((("system", "Be brief."), ("user", "2+2?")), "4."),
    ]
    path.write_text('{"prompt": "Hi!", "answer": "Hello!"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="demos.jsonl:2"):
        load_demonstrations(path)


def test_sft_learns_the_demonstrated_style(base_model_dir, sft_adapter):
    adapter, history, metrics = sft_adapter
    tokenizer = load_tokenizer(base_model_dir)
    prompts = [prompt_from_messages(m) for m in sample_prompts(64, seed=1)]
    base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    before = polite_rate(base, tokenizer, prompts)
    after = polite_rate(PeftModel.from_pretrained(base, adapter).eval(), tokenizer, prompts)
    first, last = history[0]["loss"], sum(m["loss"] for m in history[-5:]) / 5
    figures = f"polite answers {before:.1%} -> {after:.1%}; loss {first:.3f} -> {last:.3f}; {metrics}"
    assert metrics["steps"] == len(history) == 3 * 25 and last < first, figures
    assert after > before + 0.3, figures


def test_ppo_starts_from_the_sft_policy_and_keeps_it_as_reference(
    base_model_dir, sft_adapter, length_rm, tmp_path
):
    adapter, _, _ = sft_adapter
    tokenizer = load_tokenizer(base_model_dir)
    policy = load_policy(base_model_dir, PPOConfig(), reference_adapter=adapter).eval()
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), adapter).eval()
    queries = [prompt_ids(tokenizer, prompt_from_messages(m)) for m in sample_prompts(4, seed=2)]
    batch = pack(queries, [tokenizer("Blue. Thanks for asking!").input_ids] * 4, tokenizer.pad_token_id)
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    with torch.no_grad():
        expected = policy_forward(sft, head, batch, 1.0)[0]
        for name, param in policy.named_parameters():  # move the policy away from its starting point
            if "lora_B" in name and ".default." in name:
                param.add_(0.05)
        with reference_policy(policy):
            reference = policy_forward(policy, head, batch, 1.0)[0]
        moved = policy_forward(policy, head, batch, 1.0)[0]
    mask = batch.response_mask.bool()
    torch.testing.assert_close(reference[mask], expected[mask])
    assert (moved - reference)[mask].abs().max() > 1e-3
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in name for name in trainable)

    rm_dir, _ = length_rm
    history: list[dict] = []
    config = PPOConfig(steps=2, rollout_batch_size=4, minibatch_size=2, max_new_tokens=12, rollout_backend="hf")
    prompts = [prompt_from_messages(m) for m in sample_prompts(8, seed=0)]
    train_ppo(base_model_dir, rm_dir, prompts, tmp_path / "ppo", config, reference_adapter=adapter,
              on_step=history.append)  # fmt: skip
    assert abs(history[0]["kl"]) < 1e-5 and history[1]["kl"] != 0.0, history  # starts at the reference
    saved = load_file(tmp_path / "ppo" / "adapter_model.safetensors")
    assert saved.keys() == load_file(adapter / "adapter_model.safetensors").keys()
    assert not (tmp_path / "ppo" / "reference").exists()
