"""The Flower run a TrainingRound asks for, as Pollinate's shared RunConfig."""

from __future__ import annotations

from pollinate_runtime.run_config import RunConfig, run_key

__all__ = ["participating_sites", "run_config", "run_key"]

from ..api.federation import FederationSpec
from ..api.traininground import TrainingRoundSpec


def participating_sites(tr: TrainingRoundSpec, fed: FederationSpec) -> list[str]:
    return list(tr.sites) if tr.sites else [s.name for s in fed.sites]


def run_config(
    name: str, namespace: str, tr: TrainingRoundSpec, federation: str, fed: FederationSpec,
    node_ids: dict[str, int] | None = None, uid: str = "",
) -> RunConfig:
    """`node_ids`: the Flower node id of each registered site key (the Federation's status);
    `uid`: the TrainingRound's, which keys its state in S3 (run_config.run_key)."""
    s = tr.strategy
    sites = participating_sites(tr, fed)
    s3 = fed.storage.s3
    local_epochs = tr.local.epochs or (0 if tr.local.max_steps else 1)
    return RunConfig(
        training_round=name,
        training_round_uid=uid,
        namespace=namespace,
        federation=federation,
        base_model=fed.base_model.reference,
        base_model_revision=fed.base_model.revision,
        lora_rank=fed.adapter.rank,
        lora_alpha=fed.adapter.alpha,
        lora_dropout=fed.adapter.dropout,
        lora_target_modules=tuple(fed.adapter.target_modules),
        site_ranks={site.name: site.rank for site in fed.sites if site.rank and site.name in sites},
        rounds=tr.rounds,
        strategy=s.name,
        fedprox_mu=s.mu or 0.0,
        server_learning_rate=s.server_learning_rate or 0.01,
        adam_beta1=s.beta1 if s.beta1 is not None else 0.9,
        adam_beta2=s.beta2 if s.beta2 is not None else 0.99,
        adam_tau=s.tau or 1e-3,
        trim_beta=s.beta if s.beta is not None else 0.2,
        min_sites=tr.min_sites,
        fraction_per_round=tr.fraction_per_round,
        round_timeout_seconds=float(tr.round_timeout_seconds),
        sites=tuple(sites),
        site_nodes={site: node for site, node in (node_ids or {}).items() if site in sites},
        initial_adapter_version=tr.initial_adapter_version or "",
        local_epochs=local_epochs,
        local_max_steps=tr.local.max_steps or 0,
        batch_size=tr.local.batch_size,
        learning_rate=tr.local.learning_rate,
        max_grad_norm=tr.local.max_grad_norm,
        sequence_length=tr.local.sequence_length,
        gradient_checkpointing=tr.local.gradient_checkpointing,
        clipping_norm=tr.privacy.clipping_norm or 0.0,
        noise_multiplier=tr.privacy.noise_multiplier,
        target_delta=tr.privacy.target_delta,
        transport_dtype=tr.transport.dtype,
        max_update_norm=tr.transport.max_update_norm,
        max_examples_per_site=tr.max_examples_per_site,
        s3_bucket=s3.bucket,
        s3_prefix=s3.prefix if s3.prefix is not None else federation,
        s3_endpoint=s3.endpoint or "",
        s3_region=s3.region,
    )
