"""PPO rollouts by vLLM against Hugging Face `generate`, and one full PPO step split into its parts.

    python bench/rollout_bench.py [--model DIR] [--prompts 64] [--max-new-tokens 32] [--repeats 3]

Both backends are the trainer's own (trainer.policy.rollout), in one run, on the same model, the same prompts
(corpus prompts), the same length cap and temperature 1 with the same per-prompt seeds, after a warm-up
batch; answers stop at end-of-sequence as in training, so the mean answer length of each is printed beside
samples/s. The batches alternate, HF then vLLM, --repeats times, and the ratio is the median of the
pairs' ratios: on a shared machine the load moves between minutes, and a pair is timed within a second. The model is --model (default var/models/base, `make model`'s small preset) or, when that is
missing, a tiny one built into var/models/tiny. Both run on this process's --threads torch threads (1 by
default: on a shared CPU a second thread mostly waits): on the CPU the trainer's vLLM engine runs in-process.

Then one PPO step per backend (rollout_batch_size = --prompts, the default minibatches and epochs, an
untrained reward model of the same base: its quality does not change the timings), timed as
rollout (sampling), scoring (reward model, log-probs and values of policy and reference, advantages) and
update (the PPO epochs, with the adapter refresh). The second step is reported: the first warms up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.data import prompt_from_messages  # noqa: E402
from trainer.data.corpus import sample_prompts  # noqa: E402
from trainer.init_model import build_base_model  # noqa: E402
from trainer.policy.ppo import PPOConfig, load_policy, train_ppo  # noqa: E402
from trainer.policy.rollout import HFRollout, VllmRollout  # noqa: E402
from trainer.reward.reward_model import RewardModel, RewardModelConfig  # noqa: E402
from trainer.tokens import load_tokenizer, prompt_ids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def base_model(requested: Path) -> Path:
    if (requested / "config.json").is_file():
        return requested
    tiny = ROOT / "var" / "models" / "tiny"
    if not (tiny / "config.json").is_file():
        print(f"{requested} has no model: building the tiny preset into {tiny}", flush=True)
        build_base_model(tiny, preset="tiny")
    return tiny


def time_side_by_side(backends: dict, queries: list[list[int]], max_new_tokens: int, repeats: int) -> dict:
    """Each backend's median batch time, samples/s and answer length, batches alternating between them."""
    seeds = list(range(len(queries)))
    for rollout in backends.values():
        rollout.generate(queries, 1, max_new_tokens, 1.0, seeds)  # warm-up
    seconds = {name: [] for name in backends}
    tokens = {name: [] for name in backends}
    for repeat in range(repeats):
        for name, rollout in backends.items():
            started = time.perf_counter()
            responses = rollout.generate(queries, 1, max_new_tokens, 1.0, [s + repeat for s in seeds])
            seconds[name].append(time.perf_counter() - started)
            tokens[name].append(sum(map(len, responses)))
    return {
        name: {
            "seconds": statistics.median(seconds[name]),
            "samples_per_s": len(queries) / statistics.median(seconds[name]),
            "mean_tokens": statistics.mean(tokens[name]) / len(queries),
            "per_repeat": seconds[name],
        }
        for name in backends
    }


def time_ppo_step(model: Path, rollout, config: PPOConfig, prompts, work: Path) -> dict[str, float]:
    history: list[dict] = []
    train_ppo(model, work / "rm", prompts, work / "adapter", config, on_step=history.append, rollout=rollout)
    return history[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "var" / "models" / "base")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = base_model(args.model)
    tokenizer = load_tokenizer(model)
    prompts = [prompt_from_messages(m) for m in sample_prompts(args.prompts, seed=0)]
    queries = [prompt_ids(tokenizer, p) for p in prompts]
    config = PPOConfig(steps=2, rollout_batch_size=args.prompts, max_new_tokens=args.max_new_tokens)
    policy = load_policy(model, config).eval()
    parameters = sum(p.numel() for p in policy.get_base_model().parameters())

    hf = HFRollout(tokenizer)
    hf.refresh(policy)
    pairs, steps, engine_start = {}, {}, {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        RewardModel.create(model, RewardModelConfig()).save(work / "rm", RewardModelConfig(), {})
        steps["hf"] = time_ppo_step(model, hf, config, prompts, work)
        for sync in ("weights", "lora"):  # one engine at a time: they would share the 2 cores
            name = f"vllm-{sync}"
            started = time.perf_counter()
            vllm = VllmRollout(model, config.lora_r, sync)
            engine_start[name] = time.perf_counter() - started
            try:
                vllm.refresh(policy)
                pairs[name] = time_side_by_side({"hf": hf, name: vllm}, queries, args.max_new_tokens, args.repeats)
                steps[name] = time_ppo_step(model, vllm, config, prompts, work)
            finally:
                vllm.close()

    print(f"\nmodel {model} ({parameters / 1e6:.2f}M parameters), torch threads {args.threads}")
    print(f"rollouts: {args.prompts} prompts, up to {args.max_new_tokens} new tokens, temperature 1; "
          f"{args.repeats} pairs of batches (hf, then vllm) after a warm-up; medians")  # fmt: skip
    print(f"{'backend':<13} {'hf s':>6} {'vllm s':>7} {'hf samples/s':>13} {'vllm samples/s':>15} "
          f"{'tokens/answer':>14} {'vs hf':>6} {'pair ratios':>12}")  # fmt: skip
    for name, timed in pairs.items():
        hf_run, vllm_run = timed["hf"], timed[name]
        ratios = [h / v for h, v in zip(hf_run["per_repeat"], vllm_run["per_repeat"], strict=True)]
        print(f"{name:<13} {hf_run['seconds']:>6.3f} {vllm_run['seconds']:>7.3f} {hf_run['samples_per_s']:>13.1f} "
              f"{vllm_run['samples_per_s']:>15.1f} {hf_run['mean_tokens']:>6.1f} / {vllm_run['mean_tokens']:<5.1f} "
              f"{statistics.median(ratios):>5.1f}x {min(ratios):>5.1f}-{max(ratios):.1f}x")  # fmt: skip
    print(
        "goal: vLLM at least 5x; vLLM engine start (once per run): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in engine_start.items())
    )
    print(
        f"\nPPO step: {args.prompts} rollouts, {config.ppo_epochs} epochs of minibatches of {config.minibatch_size}"
    )
    print(f"{'backend':<13} {'rollout':>8} {'scoring':>8} {'update':>8} {'total s':>8} {'rollout %':>10}")
    for name, m in steps.items():
        print(f"{name:<13} {m['rollout_seconds']:>8.2f} {m['scoring_seconds']:>8.2f} {m['update_seconds']:>8.2f} "
              f"{m['seconds']:>8.2f} {100 * m['rollout_seconds'] / m['seconds']:>9.0f}%")  # fmt: skip


if __name__ == "__main__":  # vLLM starts worker processes, which import this module again
    main()
