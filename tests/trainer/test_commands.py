"""`python -m trainer sft | rm | ppo` as processes: alone, under torchrun with two data-parallel ranks, and
under `accelerate launch --use_fsdp` with two ranks sharding the frozen weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.policy.test_sft import polite_demonstrations
from tests.trainer.preferences import WORDING
from trainer.data import prompt_to_messages
from trainer.data.corpus import sample_prompts

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMINGS = {"tokens_per_s", "rollout_seconds", "scoring_seconds", "update_seconds", "seconds"}
SHARE = "weights_on_rank"  # the fraction of a model's weights one rank holds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: str) -> list[str]:
    """The command line that starts a Python module under `launcher` ("python", "torchrun", "fsdp")."""
    if launcher == "python":
        return [sys.executable]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]
    return [str(BIN / "accelerate"), "launch", "--num_processes=2", f"--main_process_port={free_port()}",
            "--use_fsdp", "--fsdp_version=2", "--fsdp_transformer_layer_cls_to_wrap=LlamaDecoderLayer",
            "--mixed_precision=no", "--num_machines=1", "--dynamo_backend=no"]  # fmt: skip


def trainer(args: list[str], base_model: Path, launcher: str = "python") -> list[dict]:
    """Run `python -m trainer ARGS` under `launcher`; return its JSON lines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLHF_BASE_MODEL": str(base_model)}
    done = subprocess.run([*launch(launcher), "-m", "trainer", *args], cwd=ROOT, env=env, capture_output=True,
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

    rm = trainer(["rm", "--data", str(data["comparisons"]), "--out", str(tmp_path / "rm")], base_model_dir)
    rm_metrics = events(rm, "rm.finished")[0]["metrics"]
    assert rm_metrics["heldout_pairwise_accuracy"] > 0.7 and rm_metrics["heldout_pairwise_n"] > 0, rm_metrics

    ppo = trainer(["ppo", "--reward-model", str(tmp_path / "rm"), "--sft-adapter", str(tmp_path / "sft"),
                   "--prompts", str(data["prompts"]), "--out", str(tmp_path / "ppo"), *PPO_SETTINGS],
                  base_model_dir)  # fmt: skip
    steps = [line["metrics"] for line in events(ppo, "ppo.step")]
    assert [m["step"] for m in steps] == [1, 2, 3] and abs(steps[0]["kl"]) < 1e-5  # starts at the SFT policy
    assert {"reward_mean", "reward_std", "kl", "entropy", "clipfrac", "approx_kl", "policy_loss", "value_loss",
            "explained_variance", "response_length", "ptx_loss", "tokens_per_s"} <= steps[0].keys()  # fmt: skip
    assert (tmp_path / "ppo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ppo-checkpoints" / "step-000003").is_dir()


# Two ranks compute the same sums as one process in another order (float32). Measured with the tiny model,
# torchrun and FSDP alike (FSDP gathers the very same weights): SFT losses within 1.5e-7 relative, PPO
# step metrics within 1.7e-5 relative (the KL), adapter weights within 2.5e-6 absolute. The test allows
# 1e-3 relative or 1e-5 absolute.
TWO_RANKS_RTOL, TWO_RANKS_ATOL = 1e-3, 1e-5


def assert_same_adapters(one: Path, two: Path) -> None:
    two_weights = load_file(two / "adapter_model.safetensors")
    for name, tensor in load_file(one / "adapter_model.safetensors").items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=TWO_RANKS_RTOL, atol=TWO_RANKS_ATOL)


def train_all(out: Path, data: dict[str, Path], base_model: Path, launcher: str, reward_model: Path) -> dict:
    """SFT, RM and PPO (against `reward_model`) under `launcher`; their per-step and final metrics."""
    sft = trainer(["sft", "--data", str(data["demonstrations"]), "--out", str(out / "sft"),
                   "--set", "epochs=2", "--set", "batch_size=13"], base_model, launcher)  # fmt: skip
    rm = trainer(["rm", "--data", str(data["comparisons"]), "--out", str(out / "rm")], base_model, launcher)
    ppo = trainer(["ppo", "--reward-model", str(reward_model), "--prompts", str(data["prompts"]),
                   "--out", str(out / "ppo"), *PPO_SETTINGS], base_model, launcher)  # fmt: skip
    ppo_steps = [line["metrics"] for line in events(ppo, "ppo.step")]
    return {
        "sft": [line["metrics"]["loss"] for line in events(sft, "sft.step")],
        "rm": events(rm, "rm.finished")[0]["metrics"],
        "ppo": [{name: value for name, value in step.items() if name != SHARE} for step in ppo_steps],
        SHARE: [events(sft, "sft.finished")[0]["metrics"][SHARE], events(rm, "rm.finished")[0]["metrics"][SHARE],
                *(step[SHARE] for step in ppo_steps)],  # fmt: skip
    }


@pytest.fixture(scope="module")
def one_process(base_model_dir, data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("one-process")
    return out, train_all(out, data, base_model_dir, "python", out / "rm")


# SFT batches of 13 leave the last one a single demonstration (40 = 3 x 13 + 1): the second rank runs the
# forward weighted zero that a rank without rows runs (FSDP needs every rank to run every forward).
@pytest.mark.parametrize("launcher", ["torchrun", "fsdp"])
def test_two_ranks_train_as_one_process(base_model_dir, data, tmp_path, one_process, launcher):
    one_dir, one = one_process
    # PPO against the one process's reward model (the two reward models differ in rounding).
    two = train_all(tmp_path, data, base_model_dir, launcher, one_dir / "rm")
    # Each rank holds all the weights, or (FSDP) its half of the frozen ones and all of the adapter.
    assert one[SHARE] == [1.0] * 5
    assert all(0.45 < share < 0.6 for share in two[SHARE]) if launcher == "fsdp" else two[SHARE] == [1.0] * 5, two
    assert two["sft"] == pytest.approx(one["sft"], rel=TWO_RANKS_RTOL)
    assert_same_adapters(one_dir / "sft", tmp_path / "sft")
    rm_figures = ["train_loss", "heldout_pairwise_accuracy"]
    assert [two["rm"][n] for n in rm_figures] == pytest.approx([one["rm"][n] for n in rm_figures], rel=1e-3)
    assert_same_adapters(one_dir / "rm" / "adapter", tmp_path / "rm" / "adapter")
    assert len(two["ppo"]) == len(one["ppo"]) == 3
    for step_one, step_two in zip(one["ppo"], two["ppo"], strict=True):
        differ = {
            name: (step_one[name], step_two[name])
            for name in step_one.keys() - TIMINGS
            if step_two[name] != pytest.approx(step_one[name], rel=TWO_RANKS_RTOL, abs=TWO_RANKS_ATOL)
        }
        assert not differ, differ
    assert_same_adapters(one_dir / "ppo", tmp_path / "ppo")
