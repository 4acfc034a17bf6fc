"""The Flower server of a Federation: SuperLink Deployment, Service, Ingress, NetworkPolicy.

Flower 1.41 serves its fleet, control and runtime APIs as protobuf over HTTP/1.1 on one
port, so there is one Service port; the Ingress exposes only the fleet path (the control
API is for the operator, the runtime API must never leave the pod), and the NetworkPolicy
limits who reaches the port at all.
"""

from __future__ import annotations

from ..api.federation import FederationSpec
from ..settings import Settings
from . import names, secrets
from .security import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT

TLS_DIR = "/etc/pollinate/tls"
CONTROL_DIR = "/etc/pollinate/control"
STATE_DIR = "/var/lib/pollinate"
# The SuperLink's and its ServerApps' counters (prometheus_client's multiprocess files).
METRICS_DIR = "/tmp/metrics"
FLEET_PATH = "/v1/fleet"
DEFAULT_RESOURCES = {
    "requests": {"cpu": "250m", "memory": "512Mi"},
    "limits": {"memory": "4Gi"},
}


def superlink_args(spec: FederationSpec, port: int) -> list[str]:
    args = [
        "--host=0.0.0.0",
        f"--port={port}",
        f"--ssl-certfile={TLS_DIR}/tls.crt",
        f"--ssl-keyfile={TLS_DIR}/tls.key",
        f"--ssl-ca-certfile={TLS_DIR}/ca.crt",
        # The server app ships in the image; runs must never pip-install at run time.
        "--disable-runtime-dependency-installation",
        f"--database={STATE_DIR}/state.db",
    ]
    if spec.server.node_authentication:
        args.append("--enable-supernode-auth")
    return args


def deployment(name: str, namespace: str, spec: FederationSpec, settings: Settings,
               cert_fingerprint: str = "") -> dict:
    port = settings.flower_port
    labels = names.server_labels(name)
    s3 = spec.storage.s3
    probe = {
        "httpGet": {"path": "/health", "port": "flower", "scheme": "HTTPS"},
        "periodSeconds": 10,
        "timeoutSeconds": 5,
    }
    container = {
        "name": "superlink",
        "image": spec.server.image,
        # Flower's SuperLink with a longer wait for its SQLite lock (pollinate_runtime/superlink.py).
        "command": ["pollinate-superlink"],
        "args": superlink_args(spec, port),
        "ports": [{"name": "flower", "containerPort": port, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": settings.server_metrics_port, "protocol": "TCP"}],
        "env": [
            {"name": "FLWR_HOME", "value": f"{STATE_DIR}/flwr"},
            {"name": "HOME", "value": f"{STATE_DIR}/home"},
            # The server app writes checkpoints and adapter versions with these.
            {"name": "AWS_DEFAULT_REGION", "value": s3.region},
            # Control calls must present the token in this file (pollinate_runtime.server_gate).
            {"name": "POLLINATE_CONTROL_TOKEN_FILE",
             "value": f"{CONTROL_DIR}/{secrets.CONTROL_TOKEN_KEY}"},
            # Refusals counted by the gate and the round loop (pollinate_runtime.server_metrics).
            {"name": "POLLINATE_METRICS_ADDRESS", "value": f"0.0.0.0:{settings.server_metrics_port}"},
            {"name": "PROMETHEUS_MULTIPROC_DIR", "value": METRICS_DIR},
        ],
        "envFrom": [{"secretRef": {"name": s3.credentials_secret}}],
        "readinessProbe": {**probe, "initialDelaySeconds": 2, "failureThreshold": 3},
        "livenessProbe": {**probe, "initialDelaySeconds": 20, "failureThreshold": 6},
        "resources": spec.server.resources or DEFAULT_RESOURCES,
        "securityContext": CONTAINER_SECURITY_CONTEXT,
        "volumeMounts": [
            {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
            {"name": "control", "mountPath": CONTROL_DIR, "readOnly": True},
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": names.server(name), "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            # Two SuperLinks would split the sites between them: never run both at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": names.server_selector(name)},
            "template": {
                # A new certificate restarts the server: it reads its certificate at start.
                "metadata": {"labels": labels, "annotations": {
                    f"{names.GROUP}/server-certificate": cert_fingerprint,
                    # Where a Prometheus that discovers pods by annotation finds the counters.
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": str(settings.server_metrics_port),
                }},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": POD_SECURITY_CONTEXT,
                    "containers": [container],
                    "volumes": [
                        {"name": "tls", "secret": {"secretName": tls_secret_name(name, spec)}},
                        {"name": "control", "secret": {
                            "secretName": names.control_token_secret(name), "defaultMode": 0o400,
                            "items": [{"key": secrets.CONTROL_TOKEN_KEY,
                                       "path": secrets.CONTROL_TOKEN_KEY}]}},
                        {"name": "state", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def service(name: str, namespace: str, settings: Settings) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": names.server(name), "namespace": namespace,
            "labels": names.server_labels(name),
        },
        "spec": {
            "selector": names.server_selector(name),
            "ports": [{
                "name": "flower", "port": settings.flower_port, "targetPort": "flower",
                "protocol": "TCP", "appProtocol": "https",
            }],
        },
    }


def ingress(name: str, namespace: str, spec: FederationSpec, settings: Settings) -> dict | None:
    ing = spec.server.ingress
    if ing is None:
        return None
    svc = names.server(name)
    # Flower serves TLS itself: the controller re-encrypts and verifies the server's
    # certificate against the Federation's CA (ca.crt of the server's TLS Secret) under the
    # Service's name, which that certificate carries. A Federation's own annotations cannot
    # change that (they are applied before these; the hub chart's admission policy refuses
    # them too).
    verified_hop = {
        "nginx.ingress.kubernetes.io/backend-protocol": "HTTPS",
        "nginx.ingress.kubernetes.io/proxy-ssl-secret": f"{namespace}/{tls_secret_name(name, spec)}",
        "nginx.ingress.kubernetes.io/proxy-ssl-verify": "on",
        "nginx.ingress.kubernetes.io/proxy-ssl-name": f"{svc}.{namespace}.svc",
        "nginx.ingress.kubernetes.io/proxy-ssl-server-name": "on",
    }
    tuning = {  # a Federation may change these: arrays travel in 5 MiB chunks; SuperNodes long-poll
        "nginx.ingress.kubernetes.io/proxy-body-size": "64m",
        "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
        "nginx.ingress.kubernetes.io/proxy-buffering": "off",
    }
    annotations = {**tuning, **(ing.annotations or {}), **verified_hop}
    body: dict = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": names.server(name), "namespace": namespace,
            "labels": names.server_labels(name), "annotations": annotations,
        },
        "spec": {
            "tls": [{"hosts": [ing.host], "secretName": ing.tls_secret or tls_secret_name(name, spec)}],
            "rules": [{
                "host": ing.host,
                "http": {"paths": [{
                    "path": FLEET_PATH,
                    "pathType": "Prefix",
                    "backend": {"service": {"name": svc, "port": {"number": settings.flower_port}}},
                }]},
            }],
        },
    }
    if ing.class_name:
        body["spec"]["ingressClassName"] = ing.class_name
    return body


def _namespace(name: str) -> dict:
    # The API server sets this label to each namespace's own name; nobody can give it to
    # another namespace, unlike a label a tenant chooses.
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def network_policy(name: str, namespace: str, settings: Settings) -> dict:
    """Only the ingress controller, this federation's in-cluster clients and the operator
    may reach the server's Flower port; only the metrics scraper the hub chart names (nobody,
    if it names none) its metrics port."""
    peers = [
        {"namespaceSelector": _namespace(settings.ingress_controller_namespace),
         "podSelector": {"matchLabels": settings.ingress_controller_labels}},
        # No namespaceSelector: this Federation's own namespace only.
        {"podSelector": {"matchLabels": {
            names.FEDERATION_LABEL: names.label_value(name), names.COMPONENT_LABEL: "site-client"}}},
        {"namespaceSelector": _namespace(settings.operator_namespace),
         "podSelector": {"matchLabels": settings.operator_labels}},
    ]
    rules = [{"from": peers, "ports": [{"port": settings.flower_port, "protocol": "TCP"}]}]
    if settings.metrics_scraper_namespace:
        rules.append({
            "from": [{"namespaceSelector": _namespace(settings.metrics_scraper_namespace),
                      "podSelector": {"matchLabels": settings.metrics_scraper_labels}}],
            "ports": [{"port": settings.server_metrics_port, "protocol": "TCP"}],
        })
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": names.server(name), "namespace": namespace,
            "labels": names.server_labels(name),
        },
        "spec": {
            "podSelector": {"matchLabels": names.server_selector(name)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }


def server_objects(name: str, namespace: str, spec: FederationSpec, settings: Settings,
                   cert_fingerprint: str = "") -> list[dict]:
    objects = [
        deployment(name, namespace, spec, settings, cert_fingerprint),
        service(name, namespace, settings),
        ingress(name, namespace, spec, settings),
        network_policy(name, namespace, settings),
    ]
    return [o for o in objects if o is not None]


def in_cluster_address(name: str, namespace: str, settings: Settings) -> str:
    return f"{names.server(name)}.{namespace}.svc:{settings.flower_port}"


def external_endpoint(spec: FederationSpec) -> str | None:
    return f"{spec.server.ingress.host}:443" if spec.server.ingress else None


def tls_dns_names(name: str, namespace: str, spec: FederationSpec) -> list[str]:
    svc = names.server(name)
    dns = [svc, f"{svc}.{namespace}", f"{svc}.{namespace}.svc", f"{svc}.{namespace}.svc.cluster.local",
           "localhost"]
    if spec.server.ingress:
        dns.insert(0, spec.server.ingress.host)
    return dns


def tls_secret_name(name: str, spec: FederationSpec) -> str:
    """The Secret with ca.crt, tls.crt and tls.key the server presents: the user's or ours."""
    return spec.server.tls.secret_name or names.server_tls_secret(name)
