"""`python -m trainer sft | rm | ppo`: InstructGPT's three steps, one command each, outside the loop.

Data comes from JSON-lines files (trainer.data's loaders) and/or the trainer's feedback store. Each command
logs one JSON line per training step on stdout (as `python -m trainer run` does), sets the Prometheus gauges
of trainer.metrics (served on --metrics-port), and runs data-parallel under
`torchrun --nproc_per_node N -m trainer ...` (trainer.distributed), where only rank 0 logs and serves.
Config fields are set with `--set name=value` (e.g. `--set steps=50 --set rollout_backend=vllm`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from prometheus_client import start_http_server

from trainer import metrics
from trainer.data import (
    Demonstration,
    RewardDataset,
    load_comparisons,
    load_demonstrations,
    load_prompts,
    prompt_from_messages,
)
from trainer.data.corpus import sample_prompts
from trainer.data.split import Side, split_dataset
from trainer.data.store import FeedbackStore, TrainingData
from trainer.distributed import init as init_distributed
from trainer.loop import JsonLines, ptx_texts
from trainer.policy.ppo import PPOConfig, train_ppo
from trainer.policy.sft import SFTConfig, train_sft
from trainer.reward.reward_model import RewardModelConfig, train_reward_model

log = logging.getLogger("trainer.commands")


def add_common_arguments(parser: argparse.ArgumentParser, default_base_model: Path) -> None:
    parser.add_argument("--base-model", type=Path, default=default_base_model, help="Hugging Face model dir")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the result into")
    parser.add_argument("--store", type=Path, help="the trainer's feedback store (SQLite) to read data from")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="overrides",
                        help="set a field of the command's config dataclass; repeatable")  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")


def with_overrides(config, overrides: list[str]):
    """`config` with NAME=VALUE strings applied, each converted to the type of the field's default."""
    changes = {}
    for override in overrides:
        name, _, value = override.partition("=")
        if name not in {f.name for f in dataclasses.fields(config)}:
            raise SystemExit(f"{type(config).__name__} has no field {name!r}")
        default = getattr(config, name)
        if isinstance(default, bool):
            changes[name] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            changes[name] = tuple(value.split(","))
        else:
            changes[name] = type(default)(value)
    return dataclasses.replace(config, **changes)


def _store_data(path: Path | None) -> TrainingData:
    if path is None:
        return TrainingData(RewardDataset(), [])
    store = FeedbackStore(path)
    try:
        return store.training_snapshot().data
    finally:
        store.close()


def _start(args: argparse.Namespace) -> None:
    """JSON-lines logging and the metrics endpoint, on rank 0 only."""
    world = init_distributed()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLines())
    level = logging.INFO if world.is_main else logging.WARNING
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if world.is_main and args.metrics_port:
        start_http_server(args.metrics_port)


def _on_step(stage: str):
    def on_step(step_metrics: dict[str, float]) -> None:
        log.info(f"{stage}.step", extra={"fields": {"metrics": step_metrics}})
        metrics.show_step(stage, step_metrics)

    return on_step


def _finished(stage: str, result: dict[str, float], out: Path) -> None:
    log.info(f"{stage}.finished", extra={"fields": {"out": str(out), "metrics": result}})
    metrics.show_step(stage, result)


def sft(args: argparse.Namespace) -> None:
    """SFT on users' corrections (--store) and demonstration files (--data)."""
    _start(args)
    demonstrations: list[Demonstration] = _store_data(args.store).demonstrations
    for path in args.data:
        demonstrations += load_demonstrations(path)
    config = with_overrides(SFTConfig(), args.overrides)
    result = train_sft(args.base_model, demonstrations, args.out, config, on_step=_on_step("sft"))
    _finished("sft", result, args.out)


def rm(args: argparse.Namespace) -> None:
    """A reward model on the store's feedback (--store) and comparison files (--data), split by prompt as
    the loop splits it (trainer.data.split): trained on the train and judge sides (there is no gate here
    to keep a judge for), measured on the held-out side, which it never trains on."""
    _start(args)
    data = _store_data(args.store).reward
    for path in args.data:
        data.groups += load_comparisons(path).groups
    sides = split_dataset(data)
    config = with_overrides(RewardModelConfig(), args.overrides)
    result = train_reward_model(
        args.base_model,
        sides[Side.TRAIN] + sides[Side.JUDGE],
        args.out,
        config,
        init_from=args.init_from,
        heldout=sides[Side.HELDOUT],
    )
    _finished("rm", result, args.out)


def ppo(args: argparse.Namespace) -> None:
    """PPO against a reward model, on prompt files (--prompts), users' prompts (--store) and corpus
    prompts; the reference is the SFT adapter (--sft-adapter) when given, else the base model."""
    _start(args)
    config = with_overrides(PPOConfig(), args.overrides)
    prompts = [p for path in args.prompts for p in load_prompts(path)]
    data = TrainingData(RewardDataset(), [])
    if args.store is not None:
        store = FeedbackStore(args.store)
        prompts += store.user_prompts(args.user_prompts)
        data = store.training_snapshot().data
        store.close()
    prompts += [prompt_from_messages(m) for m in sample_prompts(args.corpus_prompts, seed=config.seed)]
    ptx = ptx_texts(args.base_model, data.demonstrations, args.ptx_dialogues, config.seed)
    checkpoints = args.checkpoint_dir or args.out.with_name(args.out.name + "-checkpoints")
    result = train_ppo(
        args.base_model,
        args.reward_model,
        list(dict.fromkeys(prompts)),
        args.out,
        config,
        init_adapter=args.init_adapter,
        reference_adapter=args.sft_adapter,
        ptx_texts=ptx,
        on_step=_on_step("ppo"),
        checkpoint_dir=checkpoints,
    )
    _finished("ppo", result, args.out)


def add_parsers(commands, default_base_model: Path) -> None:
    """The sft, rm and ppo subcommands of `python -m trainer`."""
    parser = commands.add_parser("sft", help="supervised fine-tuning of a LoRA adapter on demonstrations")
    add_common_arguments(parser, default_base_model)
    parser.add_argument("--data", type=Path, action="append", default=[],
                        help='JSONL of {"prompt": str or chat messages, "answer": str}; repeatable')  # fmt: skip
    parser.set_defaults(run=sft)

    parser = commands.add_parser("rm", help="train a reward model; reports held-out pairwise accuracy")
    add_common_arguments(parser, default_base_model)
    parser.add_argument("--data", type=Path, action="append", default=[],
                        help='JSONL of {"prompt": ..., "chosen": str, "rejected": str}; repeatable')  # fmt: skip
    parser.add_argument("--init-from", type=Path, help="a reward model directory to continue training")
    parser.set_defaults(run=rm)

    parser = commands.add_parser("ppo", help="PPO of a LoRA policy against a reward model")
    add_common_arguments(parser, default_base_model)
    parser.add_argument("--reward-model", type=Path, required=True, help="directory written by `rm`")
    parser.add_argument("--sft-adapter", type=Path, help="SFT adapter: the reference, and the policy's start")
    parser.add_argument(
        "--init-adapter", type=Path, help="adapter to continue instead (e.g. a served version)"
    )
    parser.add_argument("--prompts", type=Path, action="append", default=[],
                        help='JSONL of {"prompt": ...}; repeatable')  # fmt: skip
    parser.add_argument("--user-prompts", type=int, default=256, help="users' prompts taken from --store")
    parser.add_argument("--corpus-prompts", type=int, default=64, help="corpus prompts mixed in")
    parser.add_argument("--ptx-dialogues", type=int, default=64, help="corpus dialogues in the ptx term")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="step checkpoints, to resume a killed run (default: OUT-checkpoints)")  # fmt: skip
    parser.set_defaults(run=ppo)
