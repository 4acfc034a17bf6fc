"""LoRA wrapping, and the adapter state that travels."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from pollinate_runtime.train.model import (
    AdapterStateError,
    LoraSettings,
    adapter_norm,
    adapter_state,
    load_adapter_state,
    load_model,
)
from safetensors.numpy import load_file
from tiny_lm import CPU, TINY_LORA
from transformers import AutoModelForCausalLM

# ---- LoRA ----------------------------------------------------------------------------------


def test_lora_wraps_only_the_target_modules(tiny_lora):
    trainable = [n for n, p in tiny_lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}


def test_unknown_target_module_is_an_error_listing_the_real_ones(tiny_model_dir: Path):
    lora = LoraSettings(rank=4, target_modules=("q_proj", "query_key_value"))
    with pytest.raises(ValueError, match=r"\['query_key_value'\] match no module.*'q_proj'"):
        load_model(str(tiny_model_dir), lora, CPU)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rank", 0, "adapter.rank 0 must be a positive integer"),
    ("alpha", -1.0, "adapter.alpha -1.0 must be positive"),
    ("dropout", 1.0, r"adapter.dropout 1.0 must be in \[0, 1\)"),
    ("target_modules", (), "adapter.targetModules is empty"),
])
def test_lora_settings_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoraSettings(**{field: value})


def test_sites_with_the_same_init_seed_start_from_the_same_adapter(tiny_model_dir: Path):
    a = adapter_state(load_model(str(tiny_model_dir), TINY_LORA, CPU, init_seed=7).model,
                      "float32")
    b = adapter_state(load_model(str(tiny_model_dir), TINY_LORA, CPU, init_seed=7).model,
                      "float32")
    c = adapter_state(load_model(str(tiny_model_dir), TINY_LORA, CPU, init_seed=8).model,
                      "float32")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


# ---- adapter state -------------------------------------------------------------------------


def random_state(like: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in like.items()}


def test_adapter_state_round_trips_exactly_in_float32(tiny_lora):
    state = random_state(adapter_state(tiny_lora.model, "float32"))
    load_adapter_state(tiny_lora.model, state)
    back = adapter_state(tiny_lora.model, "float32")
    assert back.keys() == state.keys()
    assert all(np.array_equal(back[k], state[k]) for k in state)


def test_adapter_state_keys_are_the_names_peft_saves(tiny_lora, tmp_path: Path):
    state = adapter_state(tiny_lora.model)
    tiny_lora.model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert state.keys() == saved.keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state


def test_a_state_written_in_peft_files_loads_with_peft_and_gives_the_same_logits(
        tiny_lora, tiny_model_dir: Path, tmp_path: Path):
    load_adapter_state(tiny_lora.model, random_state(adapter_state(tiny_lora.model)))
    tiny_lora.model.save_pretrained(tmp_path)
    ids = torch.arange(1, 33).view(1, 32)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path
    ).eval()
    tiny_lora.model.eval()
    with torch.no_grad():
        assert torch.allclose(tiny_lora.model(ids).logits, reloaded(ids).logits, atol=1e-6)


def test_transport_dtype_float16_halves_the_bytes_and_keeps_the_values(tiny_lora):
    load_adapter_state(tiny_lora.model, random_state(adapter_state(tiny_lora.model)))
    full = adapter_state(tiny_lora.model, "float32")
    half = adapter_state(tiny_lora.model, "float16")
    assert {v.dtype for v in half.values()} == {np.dtype("float16")}
    assert sum(v.nbytes for v in half.values()) * 2 == sum(v.nbytes for v in full.values())
    for k in full:
        np.testing.assert_allclose(half[k].astype(np.float32), full[k], rtol=1e-3, atol=1e-4)
    # A float16 state loads back (upcast to the adapter's float32).
    load_adapter_state(tiny_lora.model, half)
    assert adapter_norm(adapter_state(tiny_lora.model, "float32")) == pytest.approx(
        adapter_norm(half), rel=1e-6)


def test_unsupported_transport_dtype_is_refused(tiny_lora):
    with pytest.raises(ValueError, match="transport dtype 'bfloat16' is not one of"):
        adapter_state(tiny_lora.model, "bfloat16")


def test_mismatched_states_are_refused_with_the_reason(tiny_lora):
    good = adapter_state(tiny_lora.model, "float32")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    missing = {k: v for k, v in good.items() if k != name}
    with pytest.raises(AdapterStateError, match=re.escape(f"1 missing (first: ['{name}'])")):
        load_adapter_state(tiny_lora.model, missing)
    with pytest.raises(AdapterStateError, match="1 unexpected"):
        load_adapter_state(tiny_lora.model, {**good, "extra.lora_A.weight": good[name]})
    with pytest.raises(AdapterStateError, match=re.escape(f"{name} has shape (8, 64), "
                                                          "expected (4, 64) (rank mismatch?)")):
        load_adapter_state(tiny_lora.model, {**good, name: np.zeros((8, 64), np.float32)})
    with pytest.raises(AdapterStateError, match="has dtype int64, expected a float dtype"):
        load_adapter_state(tiny_lora.model, {**good, name: np.zeros((4, 64), np.int64)})


def test_adapter_norm_is_the_l2_norm_over_all_tensors():
    state = {"a": np.array([3.0], np.float16), "b": np.array([[4.0]], np.float32)}
    assert adapter_norm(state) == 5.0
