"""One federated round of local training on a resident model.

A round: load the global adapter into the model, train the LoRA parameters on the site's train
blocks, evaluate on its eval blocks, and return the new adapter in the transport dtype.

The optimiser is AdamW, created fresh every round: its moments would describe the site's own
previous adapter, not the global one it restarts from, and carrying them would need state that
survives a site restart. LoRA rounds are short, so the warm-up cost is small.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from peft import PeftModel

from pollinate_runtime.train import kbit
from pollinate_runtime.train.data import IGNORE_INDEX, SiteData, TokenBlocks
from pollinate_runtime.train.model import (
    TRANSPORT_DTYPES,
    adapter_norm,
    adapter_state,
    load_adapter_state,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTrainingConfig:
    """The TrainingRound's `spec.local` plus what the client adds per round.

    `max_steps` wins over `epochs` when set. `seed` fixes the batch order and dropout; pass a
    different one each round (e.g. base seed + round number) to see the data in a new order.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    learning_rate: float = 2e-4
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    fedprox_mu: float = 0.0
    seed: int = 0
    transport_dtype: str = "float16"
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        checks = [
            ("local.epochs", self.epochs, self.epochs >= 1, "an integer >= 1"),
            ("local.maxSteps", self.max_steps, self.max_steps is None or self.max_steps >= 1,
             "an integer >= 1 or unset"),
            ("local.batchSize", self.batch_size, self.batch_size >= 1, "an integer >= 1"),
            ("local.learningRate", self.learning_rate,
             math.isfinite(self.learning_rate) and self.learning_rate > 0, "a positive number"),
            ("local.maxGradNorm", self.max_grad_norm, self.max_grad_norm >= 0,
             ">= 0 (0 turns clipping off)"),
            ("local.weightDecay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("strategy.mu", self.fedprox_mu, self.fedprox_mu >= 0, ">= 0 (0 turns FedProx off)"),
            ("transport.dtype", self.transport_dtype, self.transport_dtype in TRANSPORT_DTYPES,
             f"one of {sorted(TRANSPORT_DTYPES)}"),
            ("eval_batch_size", self.eval_batch_size, self.eval_batch_size >= 1,
             "an integer >= 1"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} {value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class RoundSeconds:
    load: float
    train: float
    eval: float

    @property
    def total(self) -> float:
        return self.load + self.train + self.eval


@dataclass(frozen=True)
class LocalResult:
    adapter: dict[str, np.ndarray]  # PEFT names -> arrays in the transport dtype
    num_examples: int  # train blocks: the weight of this site in FedAvg
    steps: int
    train_loss: float  # mean LM loss over the round's steps (without the FedProx term)
    eval_loss: float  # token-weighted mean over the eval blocks; nan without eval data
    eval_perplexity: float
    adapter_norm: float  # L2 norm of the returned adapter
    update_norm: float  # L2 norm of (returned adapter - global adapter)
    seconds: RoundSeconds

    def metrics(self) -> dict[str, float]:
        """Flat scalar metrics, e.g. for a Flower MetricRecord."""
        return {
            "num-examples": float(self.num_examples),
            "steps": float(self.steps),
            "train-loss": self.train_loss,
            "eval-loss": self.eval_loss,
            "eval-perplexity": self.eval_perplexity,
            "adapter-norm": self.adapter_norm,
            "update-norm": self.update_norm,
            **{f"seconds-{k}": v for k, v in asdict(self.seconds).items()},
        }


def _lora_parameters(model: PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _batch(blocks: TokenBlocks, index: torch.Tensor, device: torch.device
           ) -> dict[str, torch.Tensor]:
    return {
        "input_ids": blocks.input_ids[index].to(device),
        "attention_mask": blocks.attention_mask[index].to(device),
        "labels": blocks.labels[index].to(device),
    }


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def _set_gradient_checkpointing(model: PeftModel, enabled: bool) -> None:
    # Tracked here: transformers 5 renamed its own flag and methods (gradient_ -> activation_).
    if enabled == getattr(model, "_pollinate_checkpointing", False):
        return
    model._pollinate_checkpointing = enabled
    base = model.get_base_model()
    renamed = hasattr(base, "activation_checkpointing_enable")
    if enabled:
        # Non-reentrant: the reentrant variant drops gradients when the inputs (frozen embeddings)
        # do not require grad, which is exactly the LoRA case.
        kwargs = {"use_reentrant": False}
        if renamed:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        base.enable_input_require_grads()
    elif renamed:
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def _step_plan(n_blocks: int, config: LocalTrainingConfig) -> int:
    per_epoch = math.ceil(n_blocks / config.batch_size)
    return config.max_steps if config.max_steps is not None else per_epoch * config.epochs


StepCallback = Callable[[int, int, float], None]  # (step done, steps in round, its loss)


def train_round(model: PeftModel, global_state: Mapping[str, np.ndarray] | None,
                data: SiteData, config: LocalTrainingConfig,
                on_step: StepCallback | None = None) -> LocalResult:
    """Train the resident `model` for one round from `global_state` (None keeps the adapter the
    model has, e.g. the seeded initial one) and return the new adapter and the round's metrics.

    `on_step` is called after every optimiser step, e.g. to draw a progress bar.
    """
    if len(data.train) == 0:
        raise ValueError("the site has no training blocks; load_site_data refuses such data")
    started = time.monotonic()
    if global_state is not None:
        load_adapter_state(model, global_state)
    kbit.unpack_cpu_4bit_weights(model)
    params = _lora_parameters(model)
    if not params:
        raise RuntimeError("the model has no trainable (LoRA) parameters")
    # The FedProx anchor, and the start point for the update norm.
    anchor = [p.detach().clone() for _, p in params]
    _set_gradient_checkpointing(model, config.gradient_checkpointing)
    device = _model_device(model)
    loaded = time.monotonic()

    steps = _step_plan(len(data.train), config)
    losses = _train_steps(model, params, anchor, data.train, config, steps, device, on_step)
    trained = time.monotonic()

    eval_loss, eval_ppl = evaluate(model, data.eval, config.eval_batch_size)
    state = adapter_state(model, config.transport_dtype)
    with torch.no_grad():
        update = math.sqrt(sum(float(((p.float() - a.float()) ** 2).sum())
                               for (_, p), a in zip(params, anchor, strict=True)))
    done = time.monotonic()

    result = LocalResult(
        adapter=state,
        num_examples=len(data.train),
        steps=steps,
        train_loss=float(np.mean(losses)) if losses else math.nan,
        eval_loss=eval_loss,
        eval_perplexity=eval_ppl,
        adapter_norm=adapter_norm(state),
        update_norm=update,
        seconds=RoundSeconds(load=loaded - started, train=trained - loaded, eval=done - trained),
    )
    log.info("local round: %d steps, train loss %.4f, eval loss %.4f (ppl %.2f), "
             "update norm %.4f, %.1f s (train %.1f s)", steps, result.train_loss, eval_loss,
             eval_ppl, update, result.seconds.total, result.seconds.train)
    return result


def _train_steps(model: PeftModel, params: list[tuple[str, torch.nn.Parameter]],
                 anchor: list[torch.Tensor], blocks: TokenBlocks, config: LocalTrainingConfig,
                 steps: int, device: torch.device, on_step: StepCallback | None) -> list[float]:
    trainable = [p for _, p in params]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.empty(0, dtype=torch.long)
    losses: list[float] = []
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # dropout masks
        for step in range(steps):
            if len(order) == 0:
                # A new pass over the data, in a new order.
                order = torch.randperm(len(blocks), generator=generator)
            index, order = order[: config.batch_size], order[config.batch_size:]
            output = model(**_batch(blocks, index, device))
            loss = output.loss
            objective = loss
            if config.fedprox_mu > 0:
                # FedProx (Li et al. 2020): mu/2 * ||w - w_global||^2 keeps the site near the
                # global adapter when the sites' data disagree.
                proximal = sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True))
                objective = loss + config.fedprox_mu / 2 * proximal
            objective.backward()
            if step == 0:
                kbit.check_lora_gradients(params)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss became {value} at step {step + 1} of {steps}; "
                    f"lower local.learningRate ({config.learning_rate}) or check the data"
                )
            losses.append(value)
            if on_step is not None:
                on_step(step + 1, steps, value)
    return losses


def evaluate(model: torch.nn.Module, blocks: TokenBlocks, batch_size: int = 8
             ) -> tuple[float, float]:
    """(token-weighted mean loss, perplexity) of `model` on `blocks`; (nan, nan) when empty.

    Safe on a resident 4-bit model: it does not trigger bitsandbytes' grad-less CPU kernel.
    """
    if len(blocks) == 0:
        return math.nan, math.nan
    device = _model_device(model)
    total_loss = 0.0
    total_tokens = 0
    with kbit.inference_without_repacking(model), torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            index = torch.arange(start, min(start + batch_size, len(blocks)))
            batch = _batch(blocks, index, device)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            # Summed per token, so a padded last block weighs only its real tokens.
            targets = batch["labels"][:, 1:]
            total_loss += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum"))
            total_tokens += int((targets != IGNORE_INDEX).sum())
    if total_tokens == 0:
        return math.nan, math.nan
    loss = total_loss / total_tokens
    return loss, math.exp(min(loss, 700.0))
