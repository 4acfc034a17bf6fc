"""LoRA adapters shaped like PEFT's, for the server-side engine's tests (numpy only, no torch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

PREFIX = "base_model.model.model.layers"


def lora_adapter(
    *,
    layers: int = 2,
    rank: int = 4,
    hidden: int = 16,
    kv: int = 8,
    dtype: type = np.float32,
    scale: float = 0.1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """PEFT state-dict names and shapes for q_proj (hidden -> hidden) and v_proj (hidden -> kv)."""
    rng = np.random.default_rng(seed)
    adapter = {}
    for layer in range(layers):
        for module, out in (("q_proj", hidden), ("v_proj", kv)):
            base = f"{PREFIX}.{layer}.self_attn.{module}"
            adapter[f"{base}.lora_A.weight"] = (rng.standard_normal((rank, hidden)) * scale).astype(dtype)
            adapter[f"{base}.lora_B.weight"] = (rng.standard_normal((out, rank)) * scale).astype(dtype)
    return adapter


@pytest.fixture
def make_adapter() -> Callable[..., dict[str, np.ndarray]]:
    return lora_adapter


@pytest.fixture
def task_identity() -> Iterator[None]:
    """What Flower sets in a ServerApp process before any Message is made (tests of the round
    loop make Messages outside one)."""
    TaskIdentity.run_id = TaskIdentity.task_id = 1
    TaskIdentity.node_id = 0
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None  # type: ignore[assignment]
