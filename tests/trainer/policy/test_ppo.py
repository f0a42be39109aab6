"""PPO on the tiny base model: batching, the reference policy, rollouts, truncated answers, resuming, then
learning two preferences with the shipped defaults."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from trainer.data import prompt_from_messages
from trainer.data.corpus import generate_dialogues, sample_prompts
from trainer.evaluation.gate import EvalConfig, evaluate_candidate, sample_and_score
from trainer.loop import ppo_config
from trainer.policy.ppo import PPOConfig, load_policy, pack, policy_forward, train_ppo
from trainer.policy.rollout import HFRollout, ended
from trainer.reward.reward_model import RewardModel
from trainer.settings import TrainerSettings
from trainer.tokens import load_tokenizer, prompt_ids


def test_pack_left_pads_queries_and_right_pads_responses():
    batch = pack([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert batch.query_len == 2
    assert batch.input_ids.tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch.position_ids[1, 1:].tolist() == [0, 1, 2, 3]  # the padded row counts from its first token
    assert batch.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]


def policy_with_random_adapter(base_model_dir: Path) -> PeftModel:
    policy = load_policy(base_model_dir, PPOConfig())
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter actually change the model
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return policy.eval()


def test_policy_forward_ignores_padding_and_the_reference_is_the_base(base_model_dir):
    tokenizer = load_tokenizer(base_model_dir)
    policy = policy_with_random_adapter(base_model_dir)
    head = torch.nn.Linear(policy.config.hidden_size, 1)
    queries = [
        prompt_ids(tokenizer, (("user", q),)) for q in ["Hi!", "What colour is the sky? Please answer."]
    ]
    responses = [tokenizer("Hello there, friend.").input_ids, tokenizer("Blue.").input_ids]
    batch = pack(queries, responses, tokenizer.pad_token_id)
    mask = batch.response_mask.bool()

    with torch.no_grad():
        logprobs, values, entropy = policy_forward(policy, head, batch, temperature=1.0)
        for row in range(2):  # each row alone, without any padding, gives the same numbers
            alone = policy_forward(
                policy, head, pack(queries[row : row + 1], responses[row : row + 1], 0), 1.0
            )
            n = len(responses[row])
            for batched, single in zip((logprobs, values, entropy), alone, strict=True):
                torch.testing.assert_close(batched[row, :n], single[0], atol=1e-5, rtol=1e-5)

        with policy.disable_adapter():
            ref_logprobs, _, _ = policy_forward(policy, head, batch, temperature=1.0)
        base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
        for row in range(2):
            ids = torch.tensor([queries[row] + responses[row]])
            logits = base(input_ids=ids).logits[0, len(queries[row]) - 1 : -1]
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(responses[row])[:, None])[:, 0]
            torch.testing.assert_close(
                ref_logprobs[row, : len(responses[row])], expected, atol=1e-5, rtol=1e-5
            )
    assert (logprobs - ref_logprobs)[mask].abs().max() > 1e-3  # the adapter is on outside the context


def test_hf_rollouts_end_at_eos_and_each_prompt_has_its_own_seed(base_model_dir):
    tokenizer = load_tokenizer(base_model_dir)
    rollout = HFRollout(tokenizer)
    rollout.refresh(load_policy(base_model_dir, PPOConfig()).eval())
    queries = [prompt_ids(tokenizer, prompt_from_messages(m)) for m in sample_prompts(8, seed=3)]
    responses = rollout.generate(queries, 2, 12, 1.0, seeds=list(range(8)))
    eos = tokenizer.eos_token_id
    assert len(responses) == 16
    for response in responses:
        assert (
            1 <= len(response) <= 12 and eos not in response[:-1] and tokenizer.pad_token_id not in response
        )
        assert response[-1] == eos or len(response) == 12
    assert any(r[-1] == eos for r in responses)  # the pretrained chat model does stop
    assert responses[0] != responses[1]  # n = 2 draws two samples
    # A prompt's samples depend on its seed, not on the rest of the batch (what data-parallel ranks need).
    assert rollout.generate(queries[2:4], 2, 12, 1.0, seeds=[2, 3]) == responses[4:8]
    assert rollout.generate(queries[2:4], 2, 12, 1.0, seeds=[5, 3])[:2] != responses[4:6]


def test_a_truncated_answer_is_scored_without_end_of_sequence(base_model_dir, length_rm):
    tokenizer = load_tokenizer(base_model_dir)
    rollout = HFRollout(tokenizer)
    rollout.refresh(load_policy(base_model_dir, PPOConfig()).eval())
    prompts = [prompt_from_messages(m) for m in sample_prompts(8, seed=3)]
    queries = [prompt_ids(tokenizer, p) for p in prompts]
    responses = rollout.generate(queries, 2, 6, 1.0, seeds=list(range(8)))  # 6 tokens: some answers end
    finished = [ended(r, rollout.stop_ids) for r in responses]
    assert finished == [r[-1] == tokenizer.eos_token_id for r in responses]
    assert any(finished) and not all(finished), responses

    # What the reward model reads: the answer's tokens, then end-of-sequence only if the policy emitted it.
    rm = RewardModel.load(base_model_dir, length_rm[0])
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    answered = [p for p in prompts for _ in range(2)]
    ids, mask = rm.encode(answered, texts, finished)
    for row, (text, done) in enumerate(zip(texts, finished, strict=True)):
        read = ids[row, : mask[row].sum()].tolist()
        expected = tokenizer(text, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if done else [])
        assert read[len(read) - len(expected) :] == expected, (row, done, read)
    scores, as_if_ended = rm.score(answered, texts, ended=finished), rm.score(answered, texts)
    cut = torch.tensor([not done for done in finished])
    torch.testing.assert_close(scores[~cut], as_if_ended[~cut])
    assert (scores[cut] - as_if_ended[cut]).abs().min() > 1e-4  # a cut answer is not scored as if it had ended


def test_make_up_trains_with_the_defaults_the_learning_tests_use(monkeypatch):
    # `make up` sets no TRAINER_* variable: each round runs PPOConfig's defaults, its seed the round's.
    for name in [n for n in os.environ if n.startswith("TRAINER_")]:
        monkeypatch.delenv(name)
    assert ppo_config(TrainerSettings(), round_number=3) == dataclasses.replace(PPOConfig(), seed=3)


# The KL from the trained policy to the reference (the base), in nats per answer, that the learning test
# allows. Measured on the tiny base, 20 steps at lr 1e-3, 384 held-out answers: InstructGPT's beta = 0.02
# reached ~17 nats and garbled answers; beta = 0.2 reached 10.5 (wording) once rollouts ran on an
# in-process engine (same seeds, other floating-point sums); beta = 0.3 stays at 2.3 (length) and 7.1
# (wording), with gains of 4.9 and 13.8 standard errors. The bound holds for the held-out figure and
# for the training KL averaged over the last five steps (80 answers): one step's 16 answers are too few
# (a rebuilt base model's wording run went 5.6 -> 12.9 nats at its last step with 6.2 held out).
KL_BOUND = 10.0


def test_ppo_raises_the_rate_of_answers_the_hidden_preference_likes(base_model_dir, preference_rm, tmp_path):
    preference, rm_dir, _ = preference_rm
    prompts = [prompt_from_messages(m) for m in sample_prompts(64, seed=0)]
    held_out_prompts = [prompt_from_messages(m) for m in sample_prompts(96, seed=1)]
    tokenizer = load_tokenizer(base_model_dir)
    ptx_texts = [tokenizer.apply_chat_template(d, tokenize=False) for d in generate_dialogues(32, seed=5)]
    config = PPOConfig()  # what `make up` runs (test_make_up_trains_with_the_defaults_the_learning_tests_use)
    history: list[dict] = []

    final = train_ppo(
        base_model_dir,
        rm_dir,
        prompts,
        tmp_path / "adapter",
        config,
        ptx_texts=ptx_texts,
        on_step=history.append,
    )

    # One metrics dict per step, every figure finite; the first rollouts come from the base itself.
    assert [m["step"] for m in history] == list(range(1, config.steps + 1)) and final == history[-1]
    expected = {"reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl",
                "policy_loss", "value_loss", "explained_variance", "response_length", "truncated", "ptx_loss",
                "tokens_per_s", "rollout_seconds", "scoring_seconds", "update_seconds"}  # fmt: skip
    assert expected <= set(final) and all(math.isfinite(v) for m in history for v in m.values())
    assert abs(history[0]["kl"]) < 1e-5 and final["kl"] > 0.1, [m["kl"] for m in history]

    # Only a LoRA adapter on q/k/v/o is saved, as vLLM loads it.
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all("lora_" in key for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))

    # On prompts it never trained on (four answers each): answers satisfy the hidden preference clearly
    # more often than the base's (by more than three standard errors of the difference), the reward model
    # agrees, and the KL to the reference stays under the bound.
    rm = RewardModel.load(base_model_dir, rm_dir)
    sampling = EvalConfig(samples_per_prompt=4, max_new_tokens=config.max_new_tokens)
    before, after = (
        sample_and_score(load_policy(base_model_dir, config, init_adapter=adapter).eval(),
                         HFRollout(tokenizer), rm, held_out_prompts, sampling)
        for adapter in (None, tmp_path / "adapter")
    )  # fmt: skip
    (texts_before, reward_before, kl_before), (texts_after, reward_after, kl_after) = (
        (samples.texts, samples.rewards, samples.kl) for samples in (before, after)
    )
    rate_before = sum(map(preference.satisfied, texts_before)) / len(texts_before)
    rate_after = sum(map(preference.satisfied, texts_after)) / len(texts_after)
    rate_error = math.sqrt(
        (rate_before * (1 - rate_before) + rate_after * (1 - rate_after)) / len(texts_after)
    )
    reward_gain = (reward_after.mean() - reward_before.mean()).item()
    reward_error = (reward_before.var() / len(reward_before) + reward_after.var() / len(reward_after)).sqrt()
    figures = (
        f"{preference.name}: answers satisfying it {rate_before:.1%} (base) -> {rate_after:.1%} (PPO), "
        f"standard error {rate_error:.1%}; held-out reward {reward_before.mean():.3f} -> "
        f"{reward_after.mean():.3f}; KL to the reference {kl_after:.2f} nats per answer (bound {KL_BOUND}, "
        f"last five training steps {sum(m['kl'] for m in history[-5:]) / 5:.2f}); kl per step {[round(m['kl'], 2) for m in history]}; "
        f"reward_mean per step {[round(m['reward_mean'], 2) for m in history]}; "
        f"truncated per step {[round(m['truncated'], 2) for m in history]}; e.g. {texts_after[:4]}"
    )
    assert abs(kl_before) < 1e-6, figures
    assert rate_after - rate_before > 3 * rate_error, figures
    assert reward_gain > 3 * reward_error.item(), figures
    assert kl_after < KL_BOUND and sum(m["kl"] for m in history[-5:]) / 5 < KL_BOUND, figures
    print(figures)

    # The evaluation gate passes the trained policy over its parent (the base) and rejects the base as a
    # successor of the trained policy; a KL bound below the trained policy's KL rejects it too. The reward
    # model is its own judge here (tests/trainer/evaluation/test_gate.py has an independent one).
    untrained = tmp_path / "untrained"
    load_policy(base_model_dir, config).save_pretrained(untrained)
    gate_config = EvalConfig(max_new_tokens=config.max_new_tokens)
    gate = dict(judge_dir=rm_dir, policy_reward_model_dir=rm_dir, policy_config=config)
    adapter = tmp_path / "adapter"
    prompts = held_out_prompts
    forward = evaluate_candidate(base_model_dir, adapter, None, prompts, config=gate_config, **gate)
    backward = evaluate_candidate(base_model_dir, untrained, adapter, prompts, config=gate_config, **gate)
    tight_config = dataclasses.replace(gate_config, max_kl=forward.metrics["kl"] / 2)
    tight = evaluate_candidate(base_model_dir, adapter, None, prompts, config=tight_config, **gate)
    figures = f"gate: forward {forward.reasons}, backward {backward.reasons}"
    assert forward.passed and forward.metrics["judge_gain"] > 3 * forward.metrics["judge_gain_se"], figures
    assert not backward.passed and backward.metrics["judge_gain"] < 0, figures
    assert not tight.passed and tight.metrics["judge_gain"] == forward.metrics["judge_gain"], figures
    print(figures)


class Killed(Exception):
    pass


TIMINGS = {"tokens_per_s", "rollout_seconds", "scoring_seconds", "update_seconds", "seconds"}


def test_ppo_killed_after_a_step_resumes_from_its_checkpoint(base_model_dir, length_rm, tmp_path):
    rm_dir, _ = length_rm
    prompts = [prompt_from_messages(m) for m in sample_prompts(16, seed=0)]
    tokenizer = load_tokenizer(base_model_dir)
    ptx_texts = [tokenizer.apply_chat_template(d, tokenize=False) for d in generate_dialogues(8, seed=5)]
    config = PPOConfig(steps=3, rollout_batch_size=4, minibatch_size=2, ppo_epochs=2, max_new_tokens=12,
                       ptx_batch_size=2, seed=0, rollout_backend="hf")  # fmt: skip
    run = {
        "base_model": base_model_dir,
        "reward_model_dir": rm_dir,
        "prompts": prompts,
        "ptx_texts": ptx_texts,
    }
    straight: list[dict] = []
    train_ppo(**run, out_adapter_dir=tmp_path / "straight", config=config, on_step=straight.append)

    # Killed right after step 2 (its checkpoint is written before on_step runs), then started again.
    checkpoints = tmp_path / "checkpoints"
    before_kill: list[dict] = []

    def kill_after_step_2(metrics: dict) -> None:
        before_kill.append(metrics)
        if metrics["step"] == 2:
            raise Killed

    with pytest.raises(Killed):
        train_ppo(**run, out_adapter_dir=tmp_path / "resumed", config=config, on_step=kill_after_step_2,
                  checkpoint_dir=checkpoints)  # fmt: skip
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"]
    after_restart: list[dict] = []
    final = train_ppo(**run, out_adapter_dir=tmp_path / "resumed", config=config, on_step=after_restart.append,
                      checkpoint_dir=checkpoints)  # fmt: skip

    # Steps 1 and 2 are not redone, and step 3 draws and learns what the uninterrupted run did.
    assert [m["step"] for m in before_kill + after_restart] == [1.0, 2.0, 3.0] and final == after_restart[-1]
    for resumed, expected in zip(before_kill + after_restart, straight, strict=True):
        for name in expected.keys() - TIMINGS:
            assert resumed[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (
                name,
                resumed,
                expected,
            )
    weights = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for name, tensor in load_file(tmp_path / "straight" / "adapter_model.safetensors").items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=1e-5)

    # A finished run started again does nothing more; a checkpoint of another config is refused.
    again: list[dict] = []
    assert train_ppo(**run, out_adapter_dir=tmp_path / "again", config=config, on_step=again.append,
                     checkpoint_dir=checkpoints) == final and again == []  # fmt: skip
    assert (tmp_path / "again" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="another PPO config"):
        train_ppo(**run, out_adapter_dir=tmp_path / "other", config=dataclasses.replace(config, lr=1e-4),
                  checkpoint_dir=checkpoints)  # fmt: skip
