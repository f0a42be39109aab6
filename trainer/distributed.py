"""Data parallelism for the training commands under `torchrun`, and FSDP under `accelerate launch --use_fsdp`.

Every rank holds the whole trainable state (LoRA adapters and heads are small) and uses the same seeds, so
all ranks draw the same prompts, minibatches and orders; each rank does the work of its share of the rows
(`shard`), and one all-reduce per optimizer step sums the gradients. Each rank's loss is weighted by its
share of the minibatch's tokens, so the summed gradient is the gradient of the single-process loss and the
result equals a single process's up to floating-point summation order.

Launched by `accelerate launch --use_fsdp --fsdp_version 2`, the frozen base weights are sharded as well
(`World.fully_shard`: torch's FSDP2 over each transformer layer and the whole model), which is what does
not fit one device in a large model; the trainable adapter and heads stay whole on every rank and keep the
all-reduce above, so optimizer state, checkpoints and saved adapters are the same as without FSDP. A
sharded model all-gathers its weights in every forward, so every rank must run the same number of forwards:
`chunks` splits a rank's rows accordingly, and a rank left without rows runs a forward weighted zero.
Accelerate's own `Accelerator.prepare` is not used: on a CPU-only machine it silently runs without FSDP
(measured with accelerate 1.15), and it would take over the gradient reduction the ranks' loss weights rely
on. Its launcher's flags are read from the environment it sets.

Without a launcher (no WORLD_SIZE in the environment) everything here is a no-op on a world of one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Sharding:
    """FSDP2 settings, as `accelerate launch --use_fsdp --fsdp_version 2` passes them."""

    # Free each layer's gathered weights after its forward (FULL_SHARD) or keep them until the backward
    # (SHARD_GRAD_OP): memory against a second all-gather.
    reshard_after_forward: bool = True
    # Class names of the modules sharded as units; empty: the model's own (its `_no_split_modules`, e.g.
    # LlamaDecoderLayer), as Accelerate's TRANSFORMER_BASED_WRAP does.
    layer_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    sharding: Sharding | None = None  # FSDP of the frozen weights; None: every rank holds whole models

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

    def chunks(self, rows: torch.Tensor, chunk_size: int, n_rows: int) -> list[torch.Tensor]:
        """This rank's `rows` (its share of n_rows) in chunks of at most chunk_size, as many chunks on every
        rank (the most any rank needs), so that sharded models run the same forwards everywhere."""
        most = math.ceil(n_rows / self.size)
        return list(rows.tensor_split(min(len(rows), math.ceil(most / chunk_size))))

    def fully_shard(self, model: nn.Module) -> nn.Module:
        """Shard `model`'s frozen weights over the ranks (FSDP2) when the launch asked for it; its trainable
        parameters stay whole on each rank (summed by sum_gradients). Returns `model`.

        Of a PEFT model, the transformers model inside is sharded (after its adapters are loaded): its
        forward is the one that PEFT, `generate` and trainer.policy.ppo all call, and FSDP gathers the weights
        outside the layers (embeddings, final norm, head) in the forward of the module sharded last.
        """
        if self.sharding is None:
            return model
        root = model.get_base_model() if isinstance(model, PeftModel) else model
        # Rank 0's weights for all: Accelerate's launcher sets FSDP_CPU_RAM_EFFICIENT_LOADING by default,
        # and transformers then loads the checkpoint on rank 0 only (zeros elsewhere), expecting this.
        for tensor in [*root.parameters(), *root.buffers()]:
            dist.broadcast(tensor.data, src=0)
        mesh = init_device_mesh(training_device().type, (self.size,))
        trainable = {p for p in root.parameters() if p.requires_grad}
        classes = set(self.sharding.layer_classes) or set(getattr(root, "_no_split_modules", None) or ())
        units = [m for m in root.modules() if type(m).__name__ in classes]
        if not units:
            raise ValueError(f"no module of class {sorted(classes)} to shard in {type(root).__name__}")
        for unit in [*units, root]:
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.sharding.reshard_after_forward,
                        ignored_params=(trainable & set(unit.parameters())) or None)  # fmt: skip
        return model


def weights_on_rank(model: nn.Module) -> float:
    """The fraction of `model`'s weights this rank stores: 1.0 unless sharded."""
    params = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return local / sum(p.numel() for p in params)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a possibly sharded tensor (a collective: every rank must ask for the same tensors)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def training_device() -> torch.device:
    """Where this process trains: its rank's GPU (LOCAL_RANK under a launcher) if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() in ("1", "true")


def sharding_from_launch() -> Sharding | None:
    """The FSDP settings `accelerate launch` left in the environment, or None without --use_fsdp.

    Options the trainer does not implement are refused rather than ignored.
    """
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        raise RuntimeError(
            "ACCELERATE_USE_DEEPSPEED set: the trainer shards with FSDP, not DeepSpeed; launch with "
            "`accelerate launch --use_fsdp --fsdp_version 2` (docs/training.md, 'Larger models')"
        )
    if not _flag("ACCELERATE_USE_FSDP"):
        return None
    refused = {
        "FSDP_VERSION": ("2", "the trainer shards with FSDP2: add --fsdp_version 2"),
        "FSDP_AUTO_WRAP_POLICY": ("TRANSFORMER_BASED_WRAP", "only TRANSFORMER_BASED_WRAP is implemented"),
        "FSDP_OFFLOAD_PARAMS": ("false", "parameter offload is not implemented (the weights are on the CPU)"),
        "FSDP_ACTIVATION_CHECKPOINTING": ("false", "activation checkpointing is not implemented"),
        "ACCELERATE_MIXED_PRECISION": ("no", "mixed precision is not implemented: the trainer runs float32"),
    }
    for name, (accepted, why) in refused.items():
        value = os.environ.get(name, accepted)
        if value.lower() != accepted.lower():
            raise RuntimeError(f"{name}={value}: {why}")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").upper()
    classes = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return Sharding(
        reshard_after_forward=reshard in ("TRUE", "1", "FULL_SHARD"),
        layer_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
    )


def init() -> World:
    """Join the launcher's process group when there is one.

    Each collective goes through the backend of its tensors' device: gloo for CPU tensors (and for object
    collectives), NCCL for CUDA tensors when there is a GPU.
    """
    sharding = sharding_from_launch()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()  # nothing to shard over
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(training_device())  # NCCL's communicator binds to the current device
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), sharding)


def rows_of_rank(n_rows: int, world: World) -> torch.Tensor:
    return torch.arange(n_rows)[world.rank :: world.size]


def gather_rows(local: torch.Tensor, rows: torch.Tensor, n_rows: int, world: World) -> torch.Tensor:
    """The full [n_rows, ...] tensor from each rank's `local` rows (rank r holds rows r, r + size, ...)."""
    full = local.new_zeros((n_rows, *local.shape[1:]))
    full[rows] = local
    return world.sum(full)
