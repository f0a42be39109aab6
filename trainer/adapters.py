"""LoRA adapters as every trainer here builds them: on the attention projections, the shape vLLM serves."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftConfig

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_config(config, task_type: str | None = None) -> LoraConfig:
    """The LoraConfig of a trainer config (SFT, reward model, PPO) from its lora_* fields."""
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type=task_type,
    )


def adapter_rank(adapter_dir: Path) -> int:
    """The LoRA rank of a saved adapter."""
    return PeftConfig.from_pretrained(str(adapter_dir)).r
