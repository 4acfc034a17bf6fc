"""The executing testbed's ingress controller: Traefik's Kubernetes Ingress NGINX provider.

It plays the part of a cluster's edge load balancer: one host process that watches Ingresses
of class `nginx` (controller `k8s.io/ingress-nginx`, as an ingress-nginx install registers
it) through a ServiceAccount with only the rights an ingress controller needs, terminates
TLS with each Ingress's Secret on the pod bridge's address, port 443, and proxies to the
backing pods, honouring the ingress-nginx annotations (backend protocol, upstream TLS
verification). It writes that address into each Ingress's status, where a user looks for it.

A process outside the cluster reaches it the way a laptop reaches a real ingress: the
Ingress's host name resolves to the status address (outside.py).
"""

from __future__ import annotations

from pathlib import Path

from .pod_network import NetworkPlan

NAMESPACE = "ingress-nginx"
SERVICE_ACCOUNT = "ingress-nginx"
INGRESS_CLASS = "nginx"
CONTROLLER = "k8s.io/ingress-nginx"
HTTPS_PORT = 443
TOKEN_LIFETIME = "8760h"
LABELS = {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/part-of": "pollinate-testbed"}


def manifests() -> list[dict]:
    """Namespace, ServiceAccount and least-privilege RBAC of the controller, and its IngressClass."""
    meta = {"namespace": NAMESPACE, "labels": LABELS}
    read = ["get", "list", "watch"]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE, "labels": LABELS}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "pollinate-testbed-ingress", "labels": LABELS},
            "rules": [
                # What its informers watch (Traefik's ingress-nginx client), nothing more.
                {"apiGroups": [""], "resources": ["services", "secrets"], "verbs": read},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
                {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "ingressclasses"],
                 "verbs": read},
                {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses/status"], "verbs": ["update"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "pollinate-testbed-ingress", "labels": LABELS},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "pollinate-testbed-ingress"},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}],
        },
        {
            "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": INGRESS_CLASS, "labels": LABELS},
            "spec": {"controller": CONTROLLER},
        },
    ]


def command(traefik: Path, apiserver: str, ca_file: Path, token_file: Path, plan: NetworkPlan,
            ping_port: int) -> list[str]:
    """Traefik's command line: HTTPS on the bridge address, health on loopback."""
    provider = "--providers.kubernetesingressnginx"
    return [
        str(traefik),
        f"--entrypoints.websecure.address={plan.gateway}:{HTTPS_PORT}",
        "--entrypoints.websecure.http.tls=true",
        f"--entrypoints.ping.address=127.0.0.1:{ping_port}",
        "--ping=true", "--ping.entrypoint=ping",
        f"{provider}=true",
        f"{provider}.endpoint={apiserver}",
        f"{provider}.token={token_file}",
        f"{provider}.certauthfilepath={ca_file}",
        f"{provider}.ingressclass={INGRESS_CLASS}",
        f"{provider}.controllerclass={CONTROLLER}",
        f"{provider}.publishstatusaddress={plan.gateway}",
        # Flower's SuperNodes long-poll; the default 60 s idle cut would be survivable but noisy.
        "--entrypoints.websecure.transport.respondingtimeouts.idletimeout=3600s",
        "--log.level=INFO", "--accesslog=true",
        "--global.checknewversion=false", "--global.sendanonymoususage=false",
    ]

