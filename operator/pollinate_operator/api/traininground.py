"""Typed view of `crds/traininground.yaml` (spec and status)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel
from .conditions import Condition

PLURAL = "trainingrounds"
KIND = "TrainingRound"

StrategyName = Literal["fedavg", "fedprox", "fedadam", "trimmedmean", "median"]


class Strategy(ApiModel):
    name: StrategyName
    mu: float | None = None
    server_learning_rate: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None
    beta: float | None = None


class LocalTraining(ApiModel):
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 4
    learning_rate: float = 0.0002
    max_grad_norm: float = 1.0
    sequence_length: int = 256
    gradient_checkpointing: bool = False


class Privacy(ApiModel):
    clipping_norm: float | None = None
    noise_multiplier: float = 0
    target_delta: float = 0.00001


class Transport(ApiModel):
    dtype: Literal["float16", "float32"] = "float16"
    max_update_norm: float = 1000


class TrainingRoundSpec(ApiModel):
    federation: str
    rounds: int
    strategy: Strategy = Field(default_factory=lambda: Strategy(name="fedavg"))
    local: LocalTraining = Field(default_factory=LocalTraining)
    min_sites: int = 1
    fraction_per_round: float = 1.0
    round_timeout_seconds: int = 900
    pending_timeout_seconds: int = 300
    privacy: Privacy = Field(default_factory=Privacy)
    transport: Transport = Field(default_factory=Transport)
    max_examples_per_site: int = 1000000
    sites: list[str] | None = None
    initial_adapter_version: str | None = None
    suspend: bool = False
    backoff_limit: int = 2


SiteState = Literal["Pending", "Unschedulable", "Running", "Succeeded", "Failed", "External", "Excluded"]
Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]


class SiteStatus(ApiModel):
    name: str
    state: SiteState
    job: str | None = None
    node: str | None = None
    message: str | None = None


class RejectedUpdate(ApiModel):
    site: str
    reason: str


class RoundMetrics(ApiModel):
    round: int
    participants: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    general_perplexity: float | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    seconds: float | None = None
    epsilon: float | None = None
    rejected: list[RejectedUpdate] | None = None
    capped_examples: dict[str, str] | None = None
    eval_rejected: list[RejectedUpdate] | None = None


class TrainingRoundStatus(ApiModel):
    phase: Phase | None = None
    progress: str | None = None
    round: int | None = None
    rounds: int | None = None
    run_id: str | None = None
    run_key: str | None = None
    run_submissions: int | None = None
    resumed_from_round: int | None = None
    sites_ready: str | None = None
    last_perplexity: float | None = None
    adapter_version: str | None = None
    last_checkpoint: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    observed_generation: int | None = None
    sites: list[SiteStatus] = Field(default_factory=list)
    metrics: list[RoundMetrics] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
