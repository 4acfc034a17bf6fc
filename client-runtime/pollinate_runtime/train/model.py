"""The base model a site fine-tunes, and the LoRA adapter that travels.

`load_model` resolves a base model (see `sources`: Hugging Face id, folder, s3:// prefix or GGUF),
loads it on the chosen device (4-bit NF4 if asked) and wraps it with a LoRA adapter.

The adapter's wire form is `dict[str, np.ndarray]` keyed by PEFT's own state-dict names (what
`get_peft_model_state_dict` returns, e.g. `base_model.model.model.layers.0.self_attn.q_proj.
lora_A.weight`), so a saved adapter is exactly what `PeftModel.from_pretrained` reads.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pollinate_runtime.train.device import DeviceChoice
from pollinate_runtime.train.sources import (
    ModelSourceError,
    quiet_progress_bars,
    resolve_model_source,
    smollm2_path,
)

# Re-exported: a site needs only this module to get a model.
__all__ = [
    "AdapterStateError", "LoadedModel", "LoraSettings", "ModelSourceError", "adapter_norm",
    "adapter_state", "add_lora", "load_adapter_state", "load_base_model", "load_model",
    "load_tokenizer", "resolve_model_source", "smollm2_path",
]

log = logging.getLogger(__name__)

TRANSPORT_DTYPES: dict[str, np.dtype] = {"float16": np.dtype("float16"),
                                        "float32": np.dtype("float32")}


class AdapterStateError(ValueError):
    """An adapter state does not fit the model's LoRA adapter."""


@dataclass(frozen=True)
class LoraSettings:
    """The Federation's `spec.adapter`: every site must use the same values (except possibly the
    rank, which the server's aggregation reconciles)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"adapter.rank {self.rank} must be a positive integer")
        if self.alpha <= 0:
            raise ValueError(f"adapter.alpha {self.alpha} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout {self.dropout} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("adapter.targetModules is empty; name at least one module, "
                             "e.g. [q_proj, v_proj]")
        # A list from YAML/JSON would make the frozen dataclass unhashable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass
class LoadedModel:
    """A resident base model with its LoRA adapter, kept across rounds."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    device: DeviceChoice
    folder: Path
    seconds: dict[str, float] = field(default_factory=dict)


# -------------------------------------------------------------------------------------- loading


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(folder: Path, device: DeviceChoice) -> PreTrainedModel:
    """The frozen base model on `device`, 4-bit NF4 when `device.quantization == "nf4"`."""
    kwargs: dict[str, Any] = {"dtype": device.torch_dtype, "local_files_only": True}
    if device.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=device.torch_dtype,
        )
        kwargs["device_map"] = {"": device.device}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if device.quantization is None:
        model.to(device.device)
    # The KV cache is for generation; in training it only costs memory.
    model.config.use_cache = False
    return model


def add_lora(base: PreTrainedModel, lora: LoraSettings, *, init_seed: int = 0) -> PeftModel:
    """Wrap `base` with a fresh LoRA adapter.

    `init_seed` makes lora_A identical on every site (lora_B starts at zero): sites whose first
    round starts from their own initialisation must agree on it, or averaging mixes unrelated
    subspaces.
    """
    if getattr(base, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        # Checkpointing is switched per round by local.train_round, not here.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    unmatched = [t for t in lora.target_modules if t not in _module_leaf_names(base)]
    if unmatched:
        raise ValueError(
            f"adapter.targetModules {unmatched} match no module of the base model; "
            f"its linear layers are {_linear_leaf_names(base)}"
        )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 still reads transformers' deprecated is_gradient_checkpointing; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        torch.manual_seed(init_seed)
        return get_peft_model(base, lora.peft_config())


def _module_leaf_names(model: torch.nn.Module) -> set[str]:
    # PEFT matches a plain target name against the last component of a module's path.
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def _linear_leaf_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def load_model(source: str, lora: LoraSettings, device: DeviceChoice, *,
               revision: str | None = None, init_seed: int = 0,
               cache_dir: Path | None = None) -> LoadedModel:
    """Resolve, load and wrap a base model: what a site does once, then keeps resident."""
    started = time.monotonic()
    quiet_progress_bars()
    folder = resolve_model_source(source, revision, cache_dir)
    resolved = time.monotonic()
    tokenizer = load_tokenizer(folder)
    base = load_base_model(folder, device)
    model = add_lora(base, lora, init_seed=init_seed)
    done = time.monotonic()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("loaded %s on %s in %.1f s (LoRA r=%d on %s: %d trainable parameters)",
             source, device.describe(), done - started, lora.rank,
             ",".join(lora.target_modules), trainable)
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, folder=folder,
                       seconds={"resolve": resolved - started, "load": done - resolved})


# ------------------------------------------------------------------------------- adapter state


def adapter_state(model: PeftModel, dtype: str = "float16") -> dict[str, np.ndarray]:
    """The adapter's tensors as numpy arrays in the transport dtype, keyed by PEFT's names."""
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype {dtype!r} is not one of {sorted(TRANSPORT_DTYPES)}")
    state = get_peft_model_state_dict(model)
    return {
        # Via float32: numpy has no bfloat16, and the cast then rounds once, to the wire dtype.
        name: tensor.detach().to("cpu", torch.float32).numpy().astype(TRANSPORT_DTYPES[dtype])
        for name, tensor in state.items()
    }


def load_adapter_state(model: PeftModel, state: Mapping[str, np.ndarray]) -> None:
    """Set the adapter's tensors from `state` (PEFT's names, any float dtype), checking that the
    names and shapes are exactly the model's; values are cast to the adapter's own dtype."""
    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterStateError(
            f"adapter state does not match the model's LoRA adapter: "
            f"{len(missing)} missing (first: {missing[:1]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:1]})"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, current in expected.items():
        value = np.asarray(state[name])
        if tuple(value.shape) != tuple(current.shape):
            raise AdapterStateError(
                f"adapter tensor {name} has shape {tuple(value.shape)}, "
                f"expected {tuple(current.shape)} (rank mismatch?)"
            )
        if not np.issubdtype(value.dtype, np.floating):
            raise AdapterStateError(f"adapter tensor {name} has dtype {value.dtype}, "
                                    "expected a float dtype")
        tensors[name] = torch.from_numpy(np.ascontiguousarray(value)).to(
            current.device, current.dtype
        )
    result = set_peft_model_state_dict(model, tensors)
    if result.unexpected_keys:
        raise AdapterStateError(f"peft did not place {result.unexpected_keys[:3]}")


def adapter_norm(state: Mapping[str, np.ndarray]) -> float:
    """The L2 norm over all adapter tensors, accumulated in float64."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values())))
