"""The vLLM rollout backend, both ways of syncing it: it samples what the policy's adapter says, follows every
refresh, and drives PPO."""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainer.policy.test_ppo import policy_with_random_adapter
from trainer.data import prompt_from_messages
from trainer.data.corpus import sample_prompts
from trainer.policy.ppo import PPOConfig, train_ppo
from trainer.policy.rollout import HFRollout, VllmRollout, ended
from trainer.tokens import load_tokenizer, prompt_ids

pytestmark = pytest.mark.slow  # starts a vLLM engine (about 20 s on the CPU)


@pytest.mark.parametrize("sync", ["weights", "lora"])
def test_vllm_rollouts_follow_the_adapter_and_drive_ppo(base_model_dir, length_rm, tmp_path, sync):
    tokenizer = load_tokenizer(base_model_dir)
    queries = [prompt_ids(tokenizer, prompt_from_messages(m)) for m in sample_prompts(8, seed=3)]
    policy = policy_with_random_adapter(base_model_dir)
    hf = HFRollout(tokenizer)
    hf.refresh(policy)
    set_num_threads = torch.set_num_threads
    vllm = VllmRollout(base_model_dir, lora_rank=8, sync=sync)
    assert vllm.in_process  # on the CPU without a launcher, the engine runs in this process
    # vLLM's worker replaces torch.set_num_threads with a no-op; the trainer's process must keep its own.
    assert torch.set_num_threads is set_num_threads
    assert vllm.stop_ids == hf.stop_ids  # both stop an answer at the same tokens, which mark it as ended
    try:
        # Greedy answers under the adapter are the ones transformers computes: the adapter is what vLLM runs.
        vllm.refresh(policy)
        greedy = vllm.generate(queries, 1, 24, 0.0, seeds=list(range(8)))
        assert greedy == hf.generate(queries, 1, 24, 0.0, seeds=list(range(8)))
        with policy.disable_adapter():
            base_greedy = hf.generate(queries, 1, 24, 0.0, seeds=list(range(8)))
        assert greedy != base_greedy

        # Samples end at end-of-sequence, and a prompt's samples depend on its seed, not on the batch.
        rng = torch.get_rng_state()
        samples = vllm.generate(queries, 2, 12, 1.0, seeds=list(range(8)))
        assert torch.equal(torch.get_rng_state(), rng)  # vLLM's sampler drew from its own copy of the RNG
        eos = tokenizer.eos_token_id
        assert len(samples) == 16 and all(s[-1] == eos or len(s) == 12 for s in samples)
        assert [ended(s, vllm.stop_ids) for s in samples] == [s[-1] == eos for s in samples]
        assert all(eos not in s[:-1] for s in samples) and samples[0] != samples[1]
        assert vllm.generate(queries[2:4], 2, 12, 1.0, seeds=[2, 3]) == samples[4:8]
        # A batch whose prompts take more tokens than one engine step schedules (4096 by default): vLLM
        # 0.32 on the CPU crashed on seeded requests whose prefill it split across steps.
        texts = [" ".join(msg["content"] for m in sample_prompts(20, seed=k) for msg in m) for k in range(24)]
        long = [prompt_ids(tokenizer, prompt_from_messages([{"role": "user", "content": t}]))[:400] for t in texts]
        assert sum(map(len, long)) > 4096
        assert len(vllm.generate(long, 1, 4, 1.0, seeds=list(range(24)))) == 24

        # A refresh after the weights changed: the engine now runs the new adapter (here: none at all).
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.zero_()
        vllm.refresh(policy)
        assert vllm.generate(queries, 1, 24, 0.0, seeds=list(range(8))) == base_greedy
        # Also for prompts longer than a KV-cache block that the engine saw under the old weights: their
        # cached prefix must not be reused (vLLM keeps its prefix cache across a weight reload).
        assert vllm.generate(long[:4], 1, 8, 0.0, seeds=list(range(4))) == hf.generate(long[:4], 1, 8, 0.0,
                                                                                       seeds=list(range(4)))  # fmt: skip

        # PPO with vLLM rollouts: the engine is refreshed before the first rollout and after every update.
        rm_dir, _ = length_rm
        history: list[dict] = []
        config = PPOConfig(steps=2, rollout_batch_size=8, minibatch_size=4, max_new_tokens=16,
                           rollout_backend="vllm", vllm_sync=sync)  # fmt: skip
        prompts = [prompt_from_messages(m) for m in sample_prompts(16, seed=0)]
        refreshes_before = vllm.refreshes
        train_ppo(base_model_dir, rm_dir, prompts, tmp_path / "adapter", config, on_step=history.append,
                  rollout=vllm)  # fmt: skip
        assert vllm.refreshes == refreshes_before + 1 + config.steps
        assert [m["step"] for m in history] == [1, 2] and abs(history[0]["kl"]) < 1e-5
        assert all(math.isfinite(v) for m in history for v in m.values())
        assert history[1]["kl"] != 0.0  # the policy moved away from the reference
    finally:
        vllm.close()
    assert not torch.distributed.is_initialized()  # the engine's world of one went with it
