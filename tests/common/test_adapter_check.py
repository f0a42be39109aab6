"""The adapter check: a PEFT adapter trained on the base passes; each kind of broken adapter is refused."""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from common.adapter_check import BadAdapter, check_adapter
from tests.adapters import CORRUPTIONS, write_adapter


def test_an_adapter_saved_by_peft_passes(base_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        rank_pattern={"o_proj": 2})
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    check_adapter(tmp_path / "adapter", base_model_dir)
    check_adapter(write_adapter(tmp_path / "written", base_model_dir), base_model_dir)


@pytest.mark.parametrize("corrupt, reason", [
    ("nan", "non-finite"), ("wrong_shape", "do not fit"), ("truncated", "unreadable"),
    ("bad_config", "adapter_config.json unreadable"), ("unknown_module", "does not have"),
])
def test_a_broken_adapter_is_refused_with_its_reason(base_model_dir, tmp_path, corrupt, reason):
    assert corrupt in CORRUPTIONS
    with pytest.raises(BadAdapter, match=reason):
        check_adapter(write_adapter(tmp_path / "adapter", base_model_dir, corrupt=corrupt), base_model_dir)


def test_an_adapter_for_another_base_is_refused(base_model_dir, tmp_path):
    """Same module names, other sizes: the adapter of a model whose hidden size differs."""
    adapter = write_adapter(tmp_path / "adapter", base_model_dir)
    other = tmp_path / "other-base"
    other.mkdir()
    with safe_open(str(base_model_dir / "model.safetensors"), framework="pt") as f:
        save_file({k: f.get_tensor(k)[: f.get_slice(k).get_shape()[0] // 2].contiguous() for k in f.keys()},
                  str(other / "model.safetensors"))
    with pytest.raises(BadAdapter, match="do not fit"):
        check_adapter(adapter, other)
    with pytest.raises(BadAdapter, match="no tensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "adapter_config.json").write_text('{"r": 2}')
        save_file({}, str(tmp_path / "empty" / "adapter_model.safetensors"))
        check_adapter(tmp_path / "empty", base_model_dir)
