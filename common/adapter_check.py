"""Whether a saved LoRA adapter can be served on the base model: checked before it is published and again
before serving loads it, so that a bad file in the registry is refused instead of reaching vLLM.

It reads the adapter's tensors (small) and only the header of the base model's weights (their names and
shapes), so it takes milliseconds and loads no model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's prefix on every saved tensor name
_PAIRS = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}


class BadAdapter(ValueError):
    """An adapter that must not be served; the message says what is wrong with it."""


def check_adapter(adapter_dir: Path, base_model: Path) -> None:
    """Raise BadAdapter unless `adapter_dir` holds a LoRA adapter whose config parses, whose weights file is
    whole, whose every tensor is finite, and whose A/B matrices fit the base model's modules."""
    adapter_dir, base_model = Path(adapter_dir), Path(base_model)
    rank = _rank(adapter_dir / CONFIG)
    base = _base_shapes(base_model)
    tensors = _tensors(adapter_dir / WEIGHTS)
    if not tensors:
        raise BadAdapter(f"{WEIGHTS} holds no tensors")
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise BadAdapter(f"{name} has non-finite values (NaN or infinity)")
    for name, a in tensors.items():
        module, _, kind = name.removeprefix(_PREFIX).removesuffix(".weight").rpartition(".")
        if kind not in _PAIRS:
            if kind not in _PAIRS.values():
                raise BadAdapter(f"{name} is not a LoRA matrix")
            continue
        b = tensors.get(name.replace(f".{kind}", f".{_PAIRS[kind]}", 1))
        target = base.get(f"{module}.weight")
        if b is None:
            raise BadAdapter(f"{name} has no {_PAIRS[kind]} beside it")
        if target is None:
            raise BadAdapter(f"{name} targets {module!r}, which the base model {base_model} does not have")
        _check_pair(name, a.shape, b.shape, target, embedding=kind == "lora_embedding_A", rank=rank)


def _check_pair(name: str, a: torch.Size, b: torch.Size, target: list[int], embedding: bool, rank: int) -> None:
    # A linear layer's weight is (out, in): A is (r, in), B is (out, r). An embedding's is (vocab, dim):
    # A is (r, vocab), B is (dim, r).
    if len(target) != 2:
        raise BadAdapter(f"{name}: the base module's weight {target} is not a matrix")
    rows, columns = (target[1], target[0]) if embedding else (target[0], target[1])
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[1] != columns or b[0] != rows:
        raise BadAdapter(f"{name}: shapes A {list(a)} and B {list(b)} do not fit the base module {target}")
    if a[0] > rank:
        raise BadAdapter(f"{name}: rank {a[0]} exceeds the config's r={rank}")


def _rank(path: Path) -> int:
    """The largest rank the config allows: r, or a module's own in rank_pattern."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadAdapter(f"{CONFIG} unreadable: {exc}") from None
    pattern = config.get("rank_pattern") or {} if isinstance(config, dict) else None
    ranks = [config.get("r"), *pattern.values()] if isinstance(pattern, dict) else [None]
    if not all(isinstance(r, int) and r >= 1 for r in ranks):
        raise BadAdapter(f"{CONFIG} has no valid LoRA rank r")
    return max(ranks)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:  # refuses a truncated file: offsets past its end
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own errors, OSError, or ValueError on a bad header
        raise BadAdapter(f"{WEIGHTS} unreadable: {exc}") from None


def _base_shapes(base_model: Path) -> dict[str, list[int]]:
    """Names and shapes of the base model's weights, from the safetensors headers (one file or shards)."""
    index = base_model / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    shapes = {}
    for file in files:
        with safe_open(str(base_model / file), framework="pt") as f:
            shapes.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    if not shapes:
        raise FileNotFoundError(f"no weights in the base model {base_model}")
    return shapes

