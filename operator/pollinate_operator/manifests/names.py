"""Names and labels of every child object, in one place."""

from __future__ import annotations

GROUP = "pollinate.dev"
MANAGED_BY = {"app.kubernetes.io/managed-by": "pollinate-operator"}
FEDERATION_LABEL = f"{GROUP}/federation"
TRAINING_ROUND_LABEL = f"{GROUP}/traininground"
SITE_LABEL = f"{GROUP}/site"
COMPONENT_LABEL = "app.kubernetes.io/component"
ROTATION_ANNOTATION = f"{GROUP}/tls-rotation"


def server(federation: str) -> str:
    return f"{federation}-server"


def server_tls_secret(federation: str) -> str:
    return f"{federation}-server-tls"


def ca_secret(federation: str) -> str:
    return f"{federation}-ca"


def control_token_secret(federation: str) -> str:
    return f"{federation}-control-token"


def site_secrets_selector(federation: str) -> str:
    """A label selector for every site key Secret of a Federation."""
    return f"{FEDERATION_LABEL}={federation},{SITE_LABEL}"


def site_secret(federation: str, site: str) -> str:
    return f"{federation}-site-{site}"


def client_job(training_round: str, site: str) -> str:
    # Job names become pod label values (max 63) with a random suffix; keep room for it.
    return f"{training_round}-{site}"[:52].rstrip("-")


def server_labels(federation: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "flower-superlink",
        "app.kubernetes.io/instance": federation,
        COMPONENT_LABEL: "server",
        FEDERATION_LABEL: federation,
        **MANAGED_BY,
    }


def server_selector(federation: str) -> dict[str, str]:
    return {FEDERATION_LABEL: federation, COMPONENT_LABEL: "server"}


def client_labels(federation: str, training_round: str, site: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "pollinate-client",
        COMPONENT_LABEL: "site-client",
        FEDERATION_LABEL: federation,
        TRAINING_ROUND_LABEL: training_round,
        SITE_LABEL: site,
        **MANAGED_BY,
    }
