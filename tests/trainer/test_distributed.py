"""The launch environment the training commands accept: one process, torchrun's ranks, Accelerate's FSDP."""

from __future__ import annotations

import pytest
import torch

from trainer.distributed import Sharding, World, init, sharding_from_launch, training_device


def test_one_process_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = init()
    assert (world.rank, world.size, world.is_main, world.sharding) == (0, 1, True, None)
    assert list(world.shard([1, 2, 3])) == [1, 2, 3] and world.gather("x") == ["x"]


def fsdp_launch(monkeypatch, **env: str) -> None:
    """The environment `accelerate launch --use_fsdp --fsdp_version 2` sets, with `env` on top."""
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "ACCELERATE_MIXED_PRECISION": "no",
                        "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", **env}.items():  # fmt: skip
        monkeypatch.setenv(name, value)


def test_accelerate_fsdp_flags_become_sharding_settings(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding_from_launch() is None
    fsdp_launch(monkeypatch)
    assert sharding_from_launch() == Sharding(reshard_after_forward=True, layer_classes=())
    fsdp_launch(monkeypatch, FSDP_RESHARD_AFTER_FORWARD="false",
                FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer, MLP")  # fmt: skip
    assert sharding_from_launch() == Sharding(reshard_after_forward=False, layer_classes=("LlamaDecoderLayer", "MLP"))


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("FSDP_VERSION", "1", "--fsdp_version 2"),
        ("ACCELERATE_MIXED_PRECISION", "bf16", "mixed precision"),
        ("FSDP_OFFLOAD_PARAMS", "true", "offload"),
        ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP"),
    ],
)
def test_fsdp_options_the_trainer_lacks_are_refused_not_ignored(monkeypatch, name, value, why):
    fsdp_launch(monkeypatch, **{name: value})
    with pytest.raises(RuntimeError, match=why):
        sharding_from_launch()


def test_deepspeed_is_refused_not_ignored(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="not DeepSpeed"):
        init()


@pytest.mark.parametrize(("n_rows", "size", "chunk"), [(16, 2, 8), (17, 2, 8), (9, 4, 2), (65, 2, 32), (5, 2, 4)])
def test_every_rank_gets_as_many_chunks_and_all_its_rows(n_rows, size, chunk):
    counts = set()
    for rank in range(size):
        rows = torch.arange(n_rows)[rank::size]
        chunks = World(rank, size).chunks(rows, chunk, n_rows)
        assert torch.equal(torch.cat(chunks), rows) and all(0 < len(c) <= chunk for c in chunks)
        counts.add(len(chunks))
    assert len(counts) == 1, counts


def test_each_rank_trains_on_its_own_gpu_when_there_are_gpus(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device() == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert training_device() == torch.device("cuda", 0)
