"""LoRA adapters in PEFT's saved format for a given base model, whole or broken in one chosen way."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CORRUPTIONS = ("nan", "wrong_shape", "truncated", "bad_config", "unknown_module")
FAKE_BASE = Path(__file__).resolve().parent.parent / "var" / "test-cache" / "fake-base"


def fake_base_model() -> Path:
    """A stand-in base model for tests whose engine is a fake: the adapter check reads only the names and
    shapes of the base's weights, so two layers of small attention projections are all it holds."""
    if not (FAKE_BASE / "model.safetensors").is_file():
        FAKE_BASE.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=FAKE_BASE.parent))
        save_file({f"model.layers.{i}.self_attn.{p}.weight": torch.zeros(8, 8) for i in (0, 1) for p in ("q_proj",
                   "v_proj")}, str(staged / "model.safetensors"))
        try:
            os.rename(staged, FAKE_BASE)
        except OSError:  # another test session wrote the same first
            (staged / "model.safetensors").unlink()
            staged.rmdir()
    return FAKE_BASE


def write_adapter(directory: Path, base_model: Path, corrupt: str | None = None, rank: int = 2) -> Path:
    """A rank-`rank` adapter on every q_proj and v_proj of `base_model` (small random weights), or one with
    the corruption `corrupt` (one of CORRUPTIONS)."""
    directory.mkdir(parents=True, exist_ok=True)
    with safe_open(str(Path(base_model) / "model.safetensors"), framework="pt") as f:
        targets = {name: f.get_slice(name).get_shape() for name in f.keys()
                   if name.endswith(("q_proj.weight", "v_proj.weight"))}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_features, in_features) in targets.items():
        module = f"base_model.model.{name.removesuffix('.weight')}"
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.01
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    first = sorted(tensors)[0]
    if corrupt == "nan":
        tensors[first][0, 0] = float("nan")
    elif corrupt == "wrong_shape":
        tensors[first] = tensors[first][:, :-1].contiguous()
    elif corrupt == "unknown_module":
        for name in [n for n in tensors if n.startswith(first.partition(".lora_")[0])]:
            tensors[name.replace("q_proj", "x_proj")] = tensors.pop(name)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": str(base_model)}
    (directory / "adapter_config.json").write_text("{" if corrupt == "bad_config" else json.dumps(config))
    if corrupt == "truncated":
        weights = directory / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    return directory
