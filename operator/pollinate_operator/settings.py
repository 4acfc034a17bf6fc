"""The operator's own configuration: one object, read from the environment once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .reconcile.admission import ENV as ADMISSION_ENV
from .reconcile.admission import AdmissionPolicy


def _env(name: str, default: str) -> str:
    return os.environ.get(f"POLLINATE_{name}", default)


def parse_labels(variable: str, text: str) -> dict[str, str]:
    """`k=v,k2=v2` (as the chart renders a label map) -> a dict; an error names the variable."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{variable}: {item!r} is not key=value; expected labels as "
                             "key=value,key2=value2")
        labels[key.strip()] = value.strip()
    return labels


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
    # The ingress controller's namespace and pod labels: the server's NetworkPolicy admits
    # those pods, in that namespace only (a pod with the same labels elsewhere is not it).
    ingress_controller_namespace: str = "ingress-nginx"
    ingress_controller_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "ingress-nginx"}
    )
    # The operator's own namespace (the chart passes its pod's) and pod labels, admitted by
    # the NetworkPolicy to call the control API.
    operator_namespace: str = "pollinate-system"
    operator_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "pollinate-operator"}
    )
    # Each server pod serves its refusal counters (pollinate_runtime.server_metrics) on this
    # port, apart from Flower's. The NetworkPolicy admits to it only the scraper named here
    # (namespace and pod labels, both required); with no namespace, no pod at all.
    server_metrics_port: int = 9190
    metrics_scraper_namespace: str = ""
    metrics_scraper_labels: dict[str, str] = field(default_factory=dict)
    # When the operator runs outside the cluster (development, tests), reach every Flower
    # server at this host:port instead of its Service.
    flower_address_override: str | None = None
    metrics_port: int = 8080
    # Watching only some namespaces: no cluster-wide scans or peering, which a namespaced
    # Role does not allow.
    namespaced: bool = False
    # The hub chart's admission values, repeated by the operator (reconcile/admission.py).
    admission: AdmissionPolicy = field(default_factory=AdmissionPolicy)

    @classmethod
    def from_env(cls) -> Settings:
        defaults = cls()
        return cls(
            resync_seconds=float(_env("RESYNC_SECONDS", "10")),
            settled_resync_seconds=float(_env("SETTLED_RESYNC_SECONDS", "60")),
            flower_address_override=os.environ.get("POLLINATE_FLOWER_ADDRESS") or None,
            metrics_port=int(_env("METRICS_PORT", "8080")),
            namespaced=bool(os.environ.get("POLLINATE_WATCH_NAMESPACES")),
            ingress_controller_namespace=_env("INGRESS_CONTROLLER_NAMESPACE",
                                              defaults.ingress_controller_namespace),
            ingress_controller_labels=parse_labels(
                "POLLINATE_INGRESS_CONTROLLER_LABELS", _env("INGRESS_CONTROLLER_LABELS", ""),
            ) or defaults.ingress_controller_labels,
            operator_namespace=_env("OPERATOR_NAMESPACE", defaults.operator_namespace),
            metrics_scraper_namespace=_env("METRICS_SCRAPER_NAMESPACE", "").strip(),
            metrics_scraper_labels=parse_labels(
                "POLLINATE_METRICS_SCRAPER_LABELS", _env("METRICS_SCRAPER_LABELS", "")),
            admission=AdmissionPolicy.from_json(os.environ.get(ADMISSION_ENV, "")),
        )
