"""`python -m trainer sft | rm | ppo` as processes, alone and under torchrun with two data-parallel ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.preferences import WORDING
from tests.trainer.test_sft import polite_demonstrations
from trainer.corpus import sample_prompts
from trainer.data import prompt_to_messages

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMINGS = {"tokens_per_s", "rollout_seconds", "scoring_seconds", "update_seconds", "seconds"}


def trainer(args: list[str], base_model: Path, ranks: int = 1) -> list[dict]:
    """Run `python -m trainer ARGS` (under torchrun with `ranks` > 1); return its JSON lines."""
    launcher = (
        [sys.executable] if ranks == 1 else [str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLHF_BASE_MODEL": str(base_model)}
    done = subprocess.run([*launcher, "-m", "trainer", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    demonstrations = [
        {"prompt": prompt_to_messages(d.prompt), "answer": d.response}
        for d in polite_demonstrations(40, seed=3)
    ]
    comparisons = [{"prompt": prompt_to_messages(g.prompt), "chosen": chosen, "rejected": rejected}
                   for g in WORDING.feedback(seed=1, n_groups=60).groups for chosen, rejected in g.pairs]  # fmt: skip
    prompts = [{"prompt": messages} for messages in sample_prompts(16, seed=4)]
    return {name: write_jsonl(root / f"{name}.jsonl", rows) for name, rows in
            [("demonstrations", demonstrations), ("comparisons", comparisons), ("prompts", prompts)]}  # fmt: skip


def events(lines: list[dict], name: str) -> list[dict]:
    return [line for line in lines if line["event"] == name]


PPO_SETTINGS = ["--set", "steps=3", "--set", "rollout_batch_size=8", "--set", "minibatch_size=4",
                "--set", "max_new_tokens=16", "--set", "ptx_batch_size=4", "--corpus-prompts", "8",
                "--ptx-dialogues", "8", "--set", "rollout_backend=hf"]  # fmt: skip


def test_sft_rm_and_ppo_commands_log_json_lines_and_write_their_results(base_model_dir, data, tmp_path):
    sft = trainer(["sft", "--data", str(data["demonstrations"]), "--out", str(tmp_path / "sft"),
                   "--set", "epochs=2"], base_model_dir)  # fmt: skip
    assert len(events(sft, "sft.step")) == 2 * 5 and events(sft, "sft.finished")
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()

    rm = trainer(["rm", "--data", str(data["comparisons"]), "--out", str(tmp_path / "rm"),
                  "--set", "heldout_fraction=0.2"], base_model_dir)  # fmt: skip
    rm_metrics = events(rm, "rm.finished")[0]["metrics"]
    assert rm_metrics["heldout_pairwise_accuracy"] > 0.7 and rm_metrics["heldout_pairs"] > 0, rm_metrics

    ppo = trainer(["ppo", "--reward-model", str(tmp_path / "rm"), "--sft-adapter", str(tmp_path / "sft"),
                   "--prompts", str(data["prompts"]), "--out", str(tmp_path / "ppo"), *PPO_SETTINGS],
                  base_model_dir)  # fmt: skip
    steps = [line["metrics"] for line in events(ppo, "ppo.step")]
    assert [m["step"] for m in steps] == [1, 2, 3] and abs(steps[0]["kl"]) < 1e-5  # starts at the SFT policy
    assert {"reward_mean", "reward_std", "kl", "entropy", "clipfrac", "approx_kl", "policy_loss", "value_loss",
            "explained_variance", "response_length", "ptx_loss", "tokens_per_s"} <= steps[0].keys()  # fmt: skip
    assert (tmp_path / "ppo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ppo-checkpoints" / "step-000003").is_dir()


# Data-parallel ranks compute the same sums as one process in another order (float32). Measured with the
# tiny model: per-step metrics within 7e-6 relative (2e-3 for a KL of ~1e-3 nats: 2e-6 absolute), adapter
# weights within 2e-6 absolute; the test allows 1e-3 relative or 1e-5 absolute.
DATA_PARALLEL_RTOL, DATA_PARALLEL_ATOL = 1e-3, 1e-5


def assert_same_adapters(one: Path, two: Path) -> None:
    two_weights = load_file(two / "adapter_model.safetensors")
    for name, tensor in load_file(one / "adapter_model.safetensors").items():
        torch.testing.assert_close(
            two_weights[name], tensor, rtol=DATA_PARALLEL_RTOL, atol=DATA_PARALLEL_ATOL
        )


@pytest.mark.skipif(shutil.which(str(TORCHRUN)) is None, reason="torchrun is not installed")
def test_two_data_parallel_ranks_train_as_one_process(base_model_dir, data, tmp_path):
    results = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks-{ranks}"
        sft = trainer(["sft", "--data", str(data["demonstrations"]), "--out", str(out / "sft"),
                       "--set", "epochs=2", "--set", "batch_size=6"], base_model_dir, ranks)  # fmt: skip
        rm = trainer(
            ["rm", "--data", str(data["comparisons"]), "--out", str(out / "rm")], base_model_dir, ranks
        )
        # PPO of both against the same reward model (the two reward models differ in rounding).
        ppo = trainer(["ppo", "--reward-model", str(tmp_path / "ranks-1" / "rm"), "--prompts",
                       str(data["prompts"]), "--out", str(out / "ppo"), *PPO_SETTINGS], base_model_dir, ranks)  # fmt: skip
        results[ranks] = {
            "sft": [line["metrics"]["loss"] for line in events(sft, "sft.step")],
            "rm": events(rm, "rm.finished")[0]["metrics"],
            "ppo": [line["metrics"] for line in events(ppo, "ppo.step")],
        }
    one, two = results[1], results[2]
    assert two["sft"] == pytest.approx(one["sft"], rel=DATA_PARALLEL_RTOL)
    assert_same_adapters(tmp_path / "ranks-1" / "sft", tmp_path / "ranks-2" / "sft")
    rm_figures = ["train_loss", "heldout_pairwise_accuracy"]
    assert [two["rm"][n] for n in rm_figures] == pytest.approx([one["rm"][n] for n in rm_figures], rel=1e-3)
    assert_same_adapters(tmp_path / "ranks-1" / "rm" / "adapter", tmp_path / "ranks-2" / "rm" / "adapter")
    assert len(two["ppo"]) == len(one["ppo"]) == 3
    for step_one, step_two in zip(one["ppo"], two["ppo"], strict=True):
        differ = {
            name: (step_one[name], step_two[name])
            for name in step_one.keys() - TIMINGS
            if step_two[name] != pytest.approx(step_one[name], rel=DATA_PARALLEL_RTOL, abs=DATA_PARALLEL_ATOL)
        }
        assert not differ, differ
    assert_same_adapters(tmp_path / "ranks-1" / "ppo", tmp_path / "ranks-2" / "ppo")
