"""The launch environment the training commands accept: one process, torchrun's ranks, never sharding."""

from __future__ import annotations

import pytest

from trainer.distributed import init


def test_one_process_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = init()
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    assert list(world.shard([1, 2, 3])) == [1, 2, 3] and world.gather("x") == ["x"]


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharding_launch_is_refused_not_ignored(monkeypatch, flag):
    monkeypatch.setenv(flag, "true")
    with pytest.raises(RuntimeError, match="does not shard"):
        init()
    monkeypatch.setenv(flag, "false")
    assert init().size == 1
