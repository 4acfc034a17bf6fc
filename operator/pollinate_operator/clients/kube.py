"""The Kubernetes API, as the operator uses it: apply children, read what they report.

Children are written with server-side apply under one field manager, so applying the same
desired object twice is a no-op and a restarted operator never duplicates anything.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

FIELD_MANAGER = "pollinate-operator"

# The kinds the operator writes, by (apiVersion, kind): their plural in the REST path. A fixed
# table instead of the dynamic client's discovery, which fetched and kept every API group of
# the cluster (memory, and seconds at start) to find these seven.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("apps/v1", "Deployment"): "deployments",
    ("batch/v1", "Job"): "jobs",
    ("networking.k8s.io/v1", "Ingress"): "ingresses",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("pollinate.dev/v1alpha1", "Federation"): "federations",
    ("pollinate.dev/v1alpha1", "TrainingRound"): "trainingrounds",
}


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


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(api_client())


def apps() -> kubernetes.client.AppsV1Api:
    return kubernetes.client.AppsV1Api(api_client())


def batch() -> kubernetes.client.BatchV1Api:
    return kubernetes.client.BatchV1Api(api_client())


def custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(api_client())


def path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """The REST path of a namespaced object (or of its collection, without `name`)."""
    try:
        plural = PLURALS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"{api_version} {kind} is not a kind the operator writes") from None
    group = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{group}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


def request(method: str, resource_path: str, *, query: list[tuple[str, str]] | None = None,
            body: Any = None, content_type: str = "application/json") -> dict | None:
    """One call to the API server; its JSON answer as plain dicts (no typed models: decoding
    those cost more than the request), or None when the object does not exist."""
    client = api_client()
    serialized = client.param_serialize(
        method, resource_path, query_params=query or [], body=body, auth_settings=["BearerToken"],
        header_params={"Accept": "application/json", "Content-Type": content_type})
    response = client.call_api(*serialized)
    data = response.read()
    if response.status == 404:
        return None
    if not 200 <= response.status <= 299:
        raise ApiException(status=response.status, reason=response.reason,
                           body=data.decode(errors="replace") if data else None)
    return json.loads(data) if data else {}


class NotOurs(Exception):
    """An object the operator would create exists and is controlled by someone else (or by
    no one): taking it over could hand a user's Secret to the garbage collector, or adopt a CA
    or token someone else planted."""

    def __init__(self, kind: str, namespace: str, name: str, controller: str) -> None:
        super().__init__(
            f"{kind} {namespace}/{name} already exists and is not this object's (its controller: "
            f"{controller}); the operator never takes over an object it did not create: delete "
            "or rename it")
        self.kind, self.namespace, self.name = kind, namespace, name


def controller_ref(obj: Mapping[str, Any]) -> dict | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if r.get("controller")), None)


def check_ours(existing: Mapping[str, Any] | None, owner_uid: str) -> None:
    """Raise NotOurs unless `existing` is absent or controlled by the object with `owner_uid`."""
    if existing is None:
        return
    ref = controller_ref(existing)
    if ref is None or ref.get("uid") != owner_uid:
        meta = existing.get("metadata") or {}
        controller = f"{ref.get('kind')} {ref.get('name')}" if ref else "none"
        raise NotOurs(existing.get("kind", "object"), meta.get("namespace", ""), meta.get("name", ""),
                      controller)


def apply(body: dict) -> dict:
    """Create or update `body` by server-side apply; returns the object as stored. A body
    with a controller reference is applied only over nothing or over its owner's own object
    (NotOurs otherwise)."""
    meta = body["metadata"]
    owner = controller_ref(body)
    if owner is not None:
        existing = request("GET", path(body["apiVersion"], body["kind"], meta["namespace"], meta["name"]))
        if existing is not None:
            existing.setdefault("kind", body["kind"])
        check_ours(existing, owner["uid"])
    stored = request(
        "PATCH", path(body["apiVersion"], body["kind"], meta["namespace"], meta["name"]),
        query=[("fieldManager", FIELD_MANAGER), ("force", "true")], body=body,
        content_type="application/apply-patch+yaml")
    assert stored is not None  # an apply creates what is missing
    return stored


class AppliedCache:
    """What this process last applied, per child: an unchanged desired object is not sent
    again on every pass. A no-op server-side apply still costs the API server a decode and a
    managed-fields merge; at 100 Federations on a 10 s resync those no-ops were most of its
    load. A watch on each kind (handlers.level_triggered.wake_owners_of) forgets a child that
    changed or vanished, so its next pass applies it again; `max_age` bounds what a missed
    watch event could cost."""

    def __init__(self, max_age: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age, self.clock = max_age, clock
        self._sent: dict[tuple[str, str, str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
        meta = obj.get("metadata") or {}
        return (obj.get("apiVersion", ""), obj.get("kind", ""), meta.get("namespace", ""),
                meta.get("name", ""))

    def apply(self, body: dict, send: Callable[[dict], Any]) -> bool:
        """Send `body` unless the same was sent less than `max_age` ago and not forgotten
        since; True if it was sent."""
        key = self.key(body)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        now = self.clock()
        with self._lock:
            last = self._sent.get(key)
            if last and last[0] == digest and now - last[1] < self.max_age:
                return False
            # Recorded before sending: a watch event about the child that arrives while the
            # request is in flight then forgets it, instead of being overwritten after it.
            self._sent[key] = (digest, now)
            if len(self._sent) > 4096:
                self._sent = {k: v for k, v in self._sent.items() if now - v[1] < self.max_age}
        try:
            send(body)
        except BaseException:
            self.forget(body)
            raise
        return True

    def forget(self, obj: Mapping[str, Any]) -> None:
        with self._lock:
            self._sent.pop(self.key(obj), None)


APPLIED = AppliedCache()


def apply_if_changed(body: dict) -> bool:
    """`apply`, skipped when this process applied the very same object recently and no watch
    saw it change since (see AppliedCache)."""
    return APPLIED.apply(body, apply)


@dataclass(frozen=True)
class SecretData:
    data: dict[str, bytes]
    annotations: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    controller_uid: str | None = None


def _secret_data(secret: dict) -> SecretData:
    meta = secret["metadata"]
    ref = controller_ref(secret)
    return SecretData({k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()},
                      dict(meta.get("annotations") or {}), dict(meta.get("labels") or {}),
                      ref.get("uid") if ref else None)


def read_secret(namespace: str, name: str) -> SecretData | None:
    """A Secret someone names (a Federation's own TLS Secret, S3 credentials)."""
    secret = request("GET", path("v1", "Secret", namespace, name))
    return None if secret is None else _secret_data(secret)


def read_owned_secret(namespace: str, name: str, owner_uid: str) -> SecretData | None:
    """A Secret the operator made for the object with `owner_uid`: None if absent, NotOurs if
    it exists but that object does not control it (never read a CA or token someone planted)."""
    secret = request("GET", path("v1", "Secret", namespace, name))
    if secret is not None:
        secret.setdefault("kind", "Secret")
    check_ours(secret, owner_uid)
    return None if secret is None else _secret_data(secret)


def _list(api_version: str, kind: str, namespace: str, label_selector: str) -> list[dict]:
    listed = request("GET", path(api_version, kind, namespace),
                     query=[("labelSelector", label_selector)])
    return list((listed or {}).get("items") or [])


def list_secrets(namespace: str, label_selector: str) -> list[SecretData]:
    """The Secrets with these labels, their data included (one request, not one per Secret)."""
    return [_secret_data(s) for s in _list("v1", "Secret", namespace, label_selector)]


def delete(kind_api: str, kind: str, namespace: str, name: str) -> None:
    """Delete an object and, in the background, what it owns; a missing object is fine."""
    request("DELETE", path(kind_api, kind, namespace, name),
            body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})


def deployment_ready_replicas(namespace: str, name: str) -> int | None:
    # The status subresource: the chart grants it, and not reading whole Deployments.
    deployment = request("GET", path("apps/v1", "Deployment", namespace, name) + "/status")
    if deployment is None:
        return None
    return int((deployment.get("status") or {}).get("readyReplicas") or 0)


def annotate_custom(plural: str, namespace: str, name: str, annotations: dict[str, str]) -> None:
    """Merge `annotations` into a Pollinate object's metadata (a missing object is fine)."""
    request("PATCH", f"/apis/pollinate.dev/v1alpha1/namespaces/{namespace}/{plural}/{name}",
            body={"metadata": {"annotations": annotations}},
            content_type="application/merge-patch+json")


def get_custom(plural: str, namespace: str, name: str) -> dict | None:
    return request("GET", f"/apis/pollinate.dev/v1alpha1/namespaces/{namespace}/{plural}/{name}")


def list_jobs(namespace: str, label_selector: str) -> list[dict]:
    return _list("batch/v1", "Job", namespace, label_selector)


def list_pods(namespace: str, label_selector: str) -> list[dict]:
    listed = request("GET", f"/api/v1/namespaces/{namespace}/pods",
                     query=[("labelSelector", label_selector)])
    return list((listed or {}).get("items") or [])
