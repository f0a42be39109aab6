"""Data parallelism for the training commands under `torchrun`: gloo for CPU tensors, NCCL for GPU ones.

Every rank holds the whole trainable state (LoRA adapters and heads are small) and uses the same seeds, so
all ranks draw the same prompts, minibatches and orders; each rank does the work of its share of the rows
(`shard`), and one all-reduce per optimizer step sums the gradients. Each rank's loss is weighted by its
share of the minibatch's tokens, so the summed gradient is the gradient of the single-process loss and the
result equals a single process's up to floating-point summation order.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op on a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> Sequence:
        """This rank's rows of a batch: every size-th item from its rank on."""
        return items[self.rank :: self.size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `tensor` over the ranks (in place)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the ranks, in one flat all-reduce."""
        if self.size == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        for grad, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(chunk.view_as(grad))

    def gather(self, obj: object) -> list:
        """`obj` of every rank, in rank order."""
        if self.size == 1:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


# What `accelerate launch --use_fsdp / --use_deepspeed` sets. The trainer does not shard (docs/training.md,
# "Larger models"): it refuses to start rather than ignore them and run replicated.
SHARDING_LAUNCH_FLAGS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


def init() -> World:
    """Join the torchrun process group when there is one.

    Each collective goes through the backend of its tensors' device: gloo for CPU tensors (and for object
    collectives), NCCL for CUDA tensors when there is a GPU.
    """
    sharding = [flag for flag in SHARDING_LAUNCH_FLAGS if os.environ.get(flag, "").lower() in ("1", "true")]
    if sharding:
        raise RuntimeError(
            f"{' and '.join(sharding)} set: this trainer replicates its state across ranks and does not shard "
            "it yet (docs/training.md, 'Larger models'); launch without --use_fsdp / --use_deepspeed"
        )
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def rows_of_rank(n_rows: int, world: World) -> torch.Tensor:
    return torch.arange(n_rows)[world.rank :: world.size]


def gather_rows(local: torch.Tensor, rows: torch.Tensor, n_rows: int, world: World) -> torch.Tensor:
    """The full [n_rows, ...] tensor from each rank's `local` rows (rank r holds rows r, r + size, ...)."""
    full = local.new_zeros((n_rows, *local.shape[1:]))
    full[rows] = local
    return world.sum(full)
