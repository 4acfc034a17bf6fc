"""Names and labels of every child object, in one place.

A Federation or TrainingRound name may be as long as Kubernetes allows (253 characters), but
what is derived from it has tighter limits: a Service name or a label value 63, a Job name 52
(its pods' names and labels add to it). A derived name that would not fit keeps a prefix and
ends in a hash of the whole name, so two long names that share their first 60 characters
still derive different children, and the same name always derives the same ones.
"""

from __future__ import annotations

import hashlib

GROUP = "pollinate.dev"
MANAGED_BY = {"app.kubernetes.io/managed-by": "pollinate-operator"}
FEDERATION_LABEL = f"{GROUP}/federation"
TRAINING_ROUND_LABEL = f"{GROUP}/traininground"
SITE_LABEL = f"{GROUP}/site"
COMPONENT_LABEL = "app.kubernetes.io/component"
ROTATION_ANNOTATION = f"{GROUP}/tls-rotation"
CA_ROTATED_AT_ANNOTATION = f"{GROUP}/ca-rotated-at"


LABEL_VALUE_MAX = 63  # also a Service's name (a DNS-1035 label)
OBJECT_NAME_MAX = 253  # a DNS-1123 subdomain: Secrets, Deployments
JOB_NAME_MAX = 52  # the Job controller's pods add "-" and 5 characters, and a label of it
HASH_CHARS = 10


def fit(name: str, limit: int) -> str:
    """`name` if it has at most `limit` characters, else its first characters, "-" and a hash
    of all of it (`limit` characters in all; it starts and ends alphanumeric if `name` starts
    so)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_CHARS]
    return f"{name[:limit - HASH_CHARS - 1].rstrip('-.')}-{digest}"


def label_value(name: str) -> str:
    return fit(name, LABEL_VALUE_MAX)


def server(federation: str) -> str:
    # The Service's name too: a DNS-1035 label.
    return fit(f"{federation}-server", LABEL_VALUE_MAX)


def server_tls_secret(federation: str) -> str:
    return fit(f"{federation}-server-tls", OBJECT_NAME_MAX)


def ca_secret(federation: str) -> str:
    return fit(f"{federation}-ca", OBJECT_NAME_MAX)


def control_token_secret(federation: str) -> str:
    return fit(f"{federation}-control-token", OBJECT_NAME_MAX)


def site_secrets_selector(federation: str) -> str:
    """A label selector for every site key Secret of a Federation."""
    return f"{FEDERATION_LABEL}={label_value(federation)},{SITE_LABEL}"


def site_secret(federation: str, site: str) -> str:
    return fit(f"{federation}-site-{site}", OBJECT_NAME_MAX)


def client_job(training_round: str, site: str) -> str:
    return fit(f"{training_round}-{site}", JOB_NAME_MAX)


def training_round_selector(training_round: str) -> str:
    """A label selector for every client Job and pod of a TrainingRound."""
    return f"{TRAINING_ROUND_LABEL}={label_value(training_round)}"


def server_labels(federation: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "flower-superlink",
        "app.kubernetes.io/instance": label_value(federation),
        COMPONENT_LABEL: "server",
        FEDERATION_LABEL: label_value(federation),
        **MANAGED_BY,
    }


def server_selector(federation: str) -> dict[str, str]:
    return {FEDERATION_LABEL: label_value(federation), COMPONENT_LABEL: "server"}


def client_labels(federation: str, training_round: str, site: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "pollinate-client",
        COMPONENT_LABEL: "site-client",
        FEDERATION_LABEL: label_value(federation),
        TRAINING_ROUND_LABEL: label_value(training_round),
        SITE_LABEL: site,
        **MANAGED_BY,
    }
