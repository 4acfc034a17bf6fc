"""One round of local training on a resident model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pollinate_runtime.train.data import TokenBlocks, load_site_data
from pollinate_runtime.train.local import LocalTrainingConfig, evaluate, train_round
from pollinate_runtime.train.model import adapter_state, load_model
from tiny_lm import CPU, TINY_LORA
from torch.optim.optimizer import register_optimizer_step_pre_hook

FAST = LocalTrainingConfig(max_steps=30, batch_size=8, learning_rate=1e-2, seed=1,
                           transport_dtype="float32")
# bitsandbytes' CPU kernels slow down badly when the cores are shared: keep 4-bit rounds short.
FAST_4BIT = LocalTrainingConfig(max_steps=10, batch_size=8, learning_rate=3e-3, seed=1,
                                transport_dtype="float32")


@pytest.fixture
def site_data(tiny_lora, site_text_dir: Path):
    return load_site_data(site_text_dir, tiny_lora.tokenizer, seq_len=64)


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in a))


def test_a_local_round_lowers_the_eval_loss(tiny_lora, site_data):
    before, ppl_before = evaluate(tiny_lora.model, site_data.eval)
    result = train_round(tiny_lora.model, adapter_state(tiny_lora.model), site_data, FAST)
    assert result.eval_loss < before - 0.02
    assert result.eval_perplexity == pytest.approx(math.exp(result.eval_loss))
    assert result.eval_perplexity < ppl_before
    assert result.steps == 30
    assert result.num_examples == len(site_data.train)


def test_the_round_starts_from_the_global_adapter_not_the_last_local_one(tiny_lora, site_data):
    global_state = adapter_state(tiny_lora.model, "float32")
    first = train_round(tiny_lora.model, global_state, site_data, FAST)
    # Same global start, same seed: the resident model gives the same round again.
    second = train_round(tiny_lora.model, global_state, site_data, FAST)
    assert distance(first.adapter, second.adapter) < 1e-5
    assert first.train_loss == pytest.approx(second.train_loss, abs=1e-6)


def test_fedprox_keeps_the_adapter_closer_to_the_global_one(tiny_lora, site_data):
    global_state = adapter_state(tiny_lora.model, "float32")
    free = train_round(tiny_lora.model, global_state, site_data, FAST)
    prox_config = LocalTrainingConfig(**{**FAST.__dict__, "fedprox_mu": 5.0})
    prox = train_round(tiny_lora.model, global_state, site_data, prox_config)
    assert distance(prox.adapter, global_state) < 0.7 * distance(free.adapter, global_state)
    assert prox.update_norm == pytest.approx(distance(prox.adapter, global_state), rel=1e-3)


def test_the_adapter_travels_in_float16_by_default(tiny_lora, site_data):
    config = LocalTrainingConfig(max_steps=2, batch_size=4)
    result = train_round(tiny_lora.model, None, site_data, config)
    assert {v.dtype for v in result.adapter.values()} == {np.dtype("float16")}
    assert result.adapter.keys() == adapter_state(tiny_lora.model).keys()
    assert result.adapter_norm > 0


def test_the_result_reports_every_metric_and_where_the_time_went(tiny_lora, site_data):
    result = train_round(tiny_lora.model, None, site_data, LocalTrainingConfig(max_steps=3))
    metrics = result.metrics()
    assert set(metrics) == {"num-examples", "steps", "train-loss", "eval-loss", "eval-perplexity",
                            "adapter-norm", "update-norm", "seconds-load", "seconds-train",
                            "seconds-eval"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert min(result.seconds.load, result.seconds.train, result.seconds.eval) >= 0
    assert result.seconds.total == pytest.approx(
        result.seconds.load + result.seconds.train + result.seconds.eval)


def test_epochs_set_the_steps_unless_max_steps_is_given(tiny_lora, site_data):
    per_epoch = math.ceil(len(site_data.train) / 16)
    seen: list[tuple[int, int]] = []
    result = train_round(tiny_lora.model, None, site_data,
                         LocalTrainingConfig(epochs=2, batch_size=16),
                         on_step=lambda step, total, loss: seen.append((step, total)))
    assert result.steps == 2 * per_epoch
    assert seen == [(k, 2 * per_epoch) for k in range(1, 2 * per_epoch + 1)]


def test_gradient_checkpointing_gives_the_same_training(tiny_lora, site_data):
    global_state = adapter_state(tiny_lora.model, "float32")
    plain = train_round(tiny_lora.model, global_state, site_data, FAST)
    config = LocalTrainingConfig(**{**FAST.__dict__, "gradient_checkpointing": True})
    checkpointed = train_round(tiny_lora.model, global_state, site_data, config)
    assert distance(plain.adapter, checkpointed.adapter) < 1e-4


def _gradient_norms_at_each_step(model, start, data, max_grad_norm: float) -> list[float]:
    """The L2 norm of the LoRA gradients the optimiser steps with, seen by a hook run just
    before each optimiser step (after any clipping)."""
    seen: list[float] = []

    def before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        train_round(model, start, data, LocalTrainingConfig(
            max_steps=4, batch_size=8, learning_rate=1e-2, max_grad_norm=max_grad_norm, seed=1,
            transport_dtype="float32"))
    finally:
        handle.remove()
    return seen


def test_gradient_clipping_bounds_the_gradient_of_every_step(tiny_lora, site_data):
    start = adapter_state(tiny_lora.model, "float32")
    unclipped = _gradient_norms_at_each_step(tiny_lora.model, start, site_data, max_grad_norm=0.0)
    bound = min(unclipped) / 10  # well below what this data gives, so clipping must act
    clipped = _gradient_norms_at_each_step(tiny_lora.model, start, site_data, max_grad_norm=bound)
    assert len(unclipped) == len(clipped) == 4
    assert all(n > bound * 5 for n in unclipped), unclipped  # 0 turns clipping off
    assert all(n <= bound * (1 + 1e-4) for n in clipped), (bound, clipped)
    assert all(n >= bound * 0.99 for n in clipped), (bound, clipped)  # scaled to it, not zeroed


def test_evaluation_weighs_tokens_and_ignores_padding(tiny_lora, site_data):
    blocks = site_data.eval
    loss, ppl = evaluate(tiny_lora.model, blocks, batch_size=3)
    same, _ = evaluate(tiny_lora.model, blocks, batch_size=len(blocks))
    assert loss == pytest.approx(same, rel=1e-5)
    assert ppl == pytest.approx(math.exp(loss))
    # Padding a block with masked tokens changes nothing.
    one = blocks.select([0])
    padded = TokenBlocks(
        torch.cat([one.input_ids, torch.zeros(1, 8, dtype=torch.long)], 1),
        torch.cat([one.attention_mask, torch.zeros(1, 8, dtype=torch.long)], 1),
        torch.cat([one.labels, torch.full((1, 8), -100)], 1),
    )
    assert evaluate(tiny_lora.model, padded)[0] == pytest.approx(
        evaluate(tiny_lora.model, one)[0], rel=1e-5)


def test_empty_eval_data_gives_nan(tiny_lora):
    empty = TokenBlocks(*(torch.zeros(0, 8, dtype=torch.long) for _ in range(3)))
    assert all(math.isnan(x) for x in evaluate(tiny_lora.model, empty))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": 0}, "local.epochs 0 is invalid: expected an integer >= 1"),
    ({"max_steps": 0}, "local.maxSteps 0 is invalid"),
    ({"batch_size": 0}, "local.batchSize 0 is invalid"),
    ({"learning_rate": float("nan")}, "local.learningRate nan is invalid"),
    ({"max_grad_norm": -1.0}, "local.maxGradNorm -1.0 is invalid"),
    ({"fedprox_mu": -0.1}, "strategy.mu -0.1 is invalid"),
    ({"transport_dtype": "bfloat16"}, "transport.dtype 'bfloat16' is invalid"),
])
def test_training_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalTrainingConfig(**kwargs)


def test_nf4_base_weights_train_after_an_evaluation(tiny_model_dir: Path, site_text_dir: Path):
    """bitsandbytes trap 2: on a CPU with avx512_bf16 an eval forward repacks the 4-bit weights
    for a kernel without autograd, and every later LoRA gradient is None. A resident model
    evaluates every round and trains in the next, so this must keep working."""
    import bitsandbytes  # noqa: F401 - the 4-bit path needs it installed
    nf4 = CPU.__class__(device="cpu", dtype="float32", quantization="nf4")
    loaded = load_model(str(tiny_model_dir), TINY_LORA, nf4)
    assert any(type(m).__module__.startswith("bitsandbytes") for m in loaded.model.modules())
    data = load_site_data(site_text_dir, loaded.tokenizer, seq_len=32)
    before, _ = evaluate(loaded.model, data.eval)  # the forward that used to break training
    # No global state: nothing between the evaluation and training touches the weights
    # (reading the state_dict happens to undo the packing, which would hide the trap).
    first = train_round(loaded.model, None, data, FAST_4BIT)
    assert first.update_norm > 0.1
    assert first.eval_loss < before
    second = train_round(loaded.model, None, data, FAST_4BIT)  # after the round's own evaluation
    assert second.update_norm > 0.1
    assert second.eval_loss < first.eval_loss


def test_a_4bit_layer_repacked_by_someone_else_is_restored_before_training(
        tiny_model_dir: Path, site_text_dir: Path):
    import bitsandbytes  # noqa: F401 - the 4-bit path needs it installed
    from pollinate_runtime.train import kbit

    nf4 = CPU.__class__(device="cpu", dtype="float32", quantization="nf4")
    loaded = load_model(str(tiny_model_dir), TINY_LORA, nf4)
    loaded.model.eval()
    with torch.no_grad():  # e.g. a generate() call by the client app
        loaded.model(input_ids=torch.arange(1, 33).view(1, 32))
    layers = [m for m in loaded.model.modules() if type(m).__module__.startswith("bitsandbytes")]
    packed = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
                 for m in layers)
    assert kbit.unpack_cpu_4bit_weights(loaded.model) == packed
    data = load_site_data(site_text_dir, loaded.tokenizer, seq_len=32)
    assert train_round(loaded.model, None, data, FAST_4BIT).update_norm > 0.1


def test_missing_lora_gradients_stop_the_round_instead_of_training_silently():
    from pollinate_runtime.train import kbit

    with_grad = torch.nn.Parameter(torch.ones(2))
    with_grad.grad = torch.zeros(2)
    without = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match=r"1 of 2 LoRA parameters got no gradient \(first: b\)"):
        kbit.check_lora_gradients([("a", with_grad), ("b", without)])
