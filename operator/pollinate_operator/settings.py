"""The operator's own configuration: one object, read from the environment once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(f"POLLINATE_{name}", default)


@dataclass(frozen=True)
class Settings:
    # How often a resource working towards something (a server starting, a run under way) is
    # re-compared with the cluster, its Flower server and S3 (level-triggered reconcile)...
    resync_seconds: float = 10.0
    # ... and one that has settled (a Ready Federation, a finished TrainingRound), which
    # events wake at once anyway (handlers/level_triggered.timer_pass_due).
    settled_resync_seconds: float = 60.0
    # Flower's single HTTP port (fleet, control and runtime APIs) on the server pod.
    flower_port: int = 9092
    # Labels of the ingress controller's pods, admitted by the server's NetworkPolicy.
    ingress_controller_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "ingress-nginx"}
    )
    # Labels of the operator's own pods, admitted by the NetworkPolicy (control API).
    operator_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "pollinate-operator"}
    )
    # When the operator runs outside the cluster (development, tests), reach every Flower
    # server at this host:port instead of its Service.
    flower_address_override: str | None = None
    metrics_port: int = 8080
    # Watching only some namespaces: no cluster-wide scans or peering, which a namespaced
    # Role does not allow.
    namespaced: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            resync_seconds=float(_env("RESYNC_SECONDS", "10")),
            settled_resync_seconds=float(_env("SETTLED_RESYNC_SECONDS", "60")),
            flower_address_override=os.environ.get("POLLINATE_FLOWER_ADDRESS") or None,
            metrics_port=int(_env("METRICS_PORT", "8080")),
            namespaced=bool(os.environ.get("POLLINATE_WATCH_NAMESPACES")),
        )
