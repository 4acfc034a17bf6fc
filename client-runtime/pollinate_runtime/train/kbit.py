"""Care for 4-bit (bitsandbytes) base weights that a resident model needs across rounds.

bitsandbytes 0.50 on a CPU with avx512_bf16 repacks a `Linear4bit` weight for its fused inference
kernel the first time the layer runs in eval mode on an input without grad. That kernel has no
autograd, so after one evaluation every later LoRA gradient is silently `None` and training does
nothing (research/mlstack.md, trap 2). A resident model evaluates at the end of each round and
trains in the next, so:

- `inference_without_repacking` keeps the 4-bit layers' `training` flag on during evaluation (the
  flag only selects that kernel in `Linear4bit.forward`; dropout layers still go to eval mode);
- `unpack_cpu_4bit_weights` undoes a repacking someone else caused (e.g. a generate() call) before
  training;
- `check_lora_gradients` turns the silent failure into an error should a new bitsandbytes find
  another way into it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)


def _linear4bit_modules(model: nn.Module) -> list[nn.Module]:
    # Matched by name so models without bitsandbytes never import it (slow, noisy on CPU); the
    # module check skips PEFT's LoRA wrapper, which is also called Linear4bit.
    return [m for m in model.modules()
            if type(m).__name__ in ("Linear4bit", "LinearNF4")
            and type(m).__module__.startswith("bitsandbytes")]


def is_4bit(model: nn.Module) -> bool:
    return bool(_linear4bit_modules(model))


@contextlib.contextmanager
def inference_without_repacking(model: nn.Module) -> Iterator[None]:
    """Eval mode for the model (no dropout), but 4-bit layers keep `training=True` so they are not
    repacked for the grad-less CPU kernel; restores the previous modes afterwards."""
    was_training = model.training
    model.eval()
    layers = _linear4bit_modules(model)
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
        model.train(was_training)


def unpack_cpu_4bit_weights(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference packing on every 4-bit layer; returns how many it undid."""
    layers = [
        m for m in _linear4bit_modules(model)
        if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]
    if not layers:
        return 0
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for layer in layers:
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            layer.weight.data, layer.weight.quant_state
        )
    log.info("restored %d 4-bit layers from bitsandbytes' CPU inference packing", len(layers))
    return len(layers)


def check_lora_gradients(params: list[tuple[str, torch.nn.Parameter]]) -> None:
    """After the first backward of a round: every trainable (LoRA) parameter must have a gradient."""
    missing = [name for name, p in params if p.grad is None]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(params)} LoRA parameters got no gradient "
            f"(first: {missing[0]}); with 4-bit base weights this is bitsandbytes' CPU inference "
            "packing (see pollinate_runtime.train.kbit), training would silently do nothing"
        )
