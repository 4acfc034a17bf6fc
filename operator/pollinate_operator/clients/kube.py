"""The Kubernetes API, as the operator uses it: apply children, read what they report.

Children are written with server-side apply under one field manager, so applying the same
desired object twice is a no-op and a restarted operator never duplicates anything.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass

import kubernetes
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

FIELD_MANAGER = "pollinate-operator"


@functools.cache
def api_client() -> kubernetes.client.ApiClient:
    config = kubernetes.client.Configuration.get_default_copy()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)
    # As many pooled connections as kopf runs handler threads: a smaller pool discards and
    # reopens connections under load.
    config.connection_pool_maxsize = 32
    return kubernetes.client.ApiClient(config)


@functools.cache
def _dynamic() -> DynamicClient:
    return DynamicClient(api_client())


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(api_client())


def batch() -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(api_client())


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def apply(body: dict) -> dict:
    """Create or update `body` by server-side apply; returns the object as stored."""
    resource = _dynamic().resources.get(api_version=body["apiVersion"], kind=body["kind"])
    meta = body["metadata"]
    result = resource.server_side_apply(
        body=body, name=meta["name"], namespace=meta.get("namespace"),
        field_manager=FIELD_MANAGER, force_conflicts=True,
    )
    return result.to_dict()


def _absent(err: ApiException) -> bool:
    return err.status == 404


@dataclass(frozen=True)
class SecretData:
    data: dict[str, bytes]
    annotations: dict[str, str]


def read_secret(namespace: str, name: str) -> SecretData | None:
    try:
        secret = core().read_namespaced_secret(name, namespace)
    except ApiException as err:
        if _absent(err):
            return None
        raise
    data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
    return SecretData(data, dict(secret.metadata.annotations or {}))


def list_secret_names(namespace: str, label_selector: str) -> list[str]:
    secrets = core().list_namespaced_secret(namespace, label_selector=label_selector)
    return [s.metadata.name for s in secrets.items]


def list_secret_labels(namespace: str, label_selector: str, label: str) -> list[str]:
    secrets = core().list_namespaced_secret(namespace, label_selector=label_selector)
    return [s.metadata.labels[label] for s in secrets.items if label in (s.metadata.labels or {})]


def delete(kind_api: str, kind: str, namespace: str, name: str) -> None:
    resource = _dynamic().resources.get(api_version=kind_api, kind=kind)
    try:
        resource.delete(name=name, namespace=namespace, propagation_policy="Background")
    except ApiException as err:
        if not _absent(err):
            raise


def deployment_ready_replicas(namespace: str, name: str) -> int | None:
    try:
        deployment = apps().read_namespaced_deployment_status(name, namespace)
    except ApiException as err:
        if _absent(err):
            return None
        raise
    return deployment.status.ready_replicas or 0


def annotate_custom(plural: str, namespace: str, name: str, annotations: dict[str, str]) -> None:
    """Merge `annotations` into a Pollinate object's metadata (a missing object is fine)."""
    try:
        custom().patch_namespaced_custom_object(
            "pollinate.dev", "v1alpha1", namespace, plural, name,
            {"metadata": {"annotations": annotations}})
    except ApiException as err:
        if not _absent(err):
            raise


def get_custom(plural: str, namespace: str, name: str) -> dict | None:
    try:
        return custom().get_namespaced_custom_object("pollinate.dev", "v1alpha1", namespace, plural, name)
    except ApiException as err:
        if _absent(err):
            return None
        raise


def list_jobs(namespace: str, label_selector: str) -> list[dict]:
    jobs = batch().list_namespaced_job(namespace, label_selector=label_selector)
    return [api_client().sanitize_for_serialization(j) for j in jobs.items]


def list_pods(namespace: str, label_selector: str) -> list[dict]:
    pods = core().list_namespaced_pod(namespace, label_selector=label_selector)
    return [api_client().sanitize_for_serialization(p) for p in pods.items]
