"""The Node objects the node agent owns, kept Ready the way kubelet keeps its node Ready.

kubelet proves it is alive twice: by renewing a Lease in kube-node-lease every 10 s (what the
node lifecycle controller watches; a node whose lease lapses is tainted unreachable and its
pods evicted) and by posting the node's status (conditions, addresses, capacity, versions).
These nodes carry the same names, labels and capacity as the simulated ones, but not kwok's
annotation, so kwok leaves them alone.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import platform
import threading

from .kube_api import MERGE_PATCH, ApiError, KubeApi
from .nodes import cluster_nodes
from .pod_network import NetworkPlan

log = logging.getLogger(__name__)

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
AGENT_ANNOTATION = "pollinate.dev/node-agent"
KUBELET_VERSION = "v1.35.8"
LEASE_SECONDS = 40
RENEW_EVERY = 10.0
STATUS_EVERY = 30.0


def _micro_time() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def executed_nodes(plan: NetworkPlan, names: set[str] | None = None) -> list[dict]:
    """The testbed's nodes as the agent registers them: without kwok's annotation, each with
    its own pod CIDR."""
    nodes = []
    for number, node in enumerate(cluster_nodes()):
        if names is not None and node["metadata"]["name"] not in names:
            continue
        node = copy.deepcopy(node)
        meta = node["metadata"]
        meta["annotations"].pop(KWOK_ANNOTATION, None)
        meta["annotations"][AGENT_ANNOTATION] = "true"
        meta["labels"]["type"] = "node-agent"
        cidr = str(plan.node_pod_cidr(number))
        node["spec"] = {"podCIDR": cidr, "podCIDRs": [cidr]}
        nodes.append(node)
    return nodes


class NodeHeartbeat:
    """Registers the nodes, then renews their leases and posts their status until stopped."""

    def __init__(self, api: KubeApi, plan: NetworkPlan, nodes: list[dict], stop: threading.Event,
                 kubelet_port: int) -> None:
        self.api = api
        self.kubelet_port = kubelet_port
        self.plan = plan
        self.nodes = nodes
        self.stop = stop
        self.uids: dict[str, str] = {}

    def register(self) -> None:
        for node in self.nodes:
            name = node["metadata"]["name"]
            try:
                created = self.api.create("/api/v1/nodes", node)
            except ApiError as err:
                if not err.conflict:
                    raise
                # Left from a run of the same cluster: take it over from whoever had it.
                created = self.api.patch(f"/api/v1/nodes/{name}", {"metadata": {
                    "annotations": {KWOK_ANNOTATION: None, AGENT_ANNOTATION: "true"},
                    "labels": node["metadata"]["labels"]}}, content_type=MERGE_PATCH)
            self.uids[name] = created["metadata"]["uid"]
            self._post_status(node)
            self._renew_lease(name)
        log.info("registered nodes %s", ", ".join(n["metadata"]["name"] for n in self.nodes))

    def run(self) -> None:
        last_status = 0.0
        elapsed = 0.0
        while not self.stop.wait(RENEW_EVERY):
            elapsed += RENEW_EVERY
            for node in self.nodes:
                try:
                    self._renew_lease(node["metadata"]["name"])
                    if elapsed - last_status >= STATUS_EVERY:
                        self._post_status(node)
                except (ApiError, OSError) as err:
                    log.warning("heartbeat of node %s failed: %s", node["metadata"]["name"], err)
            if elapsed - last_status >= STATUS_EVERY:
                last_status = elapsed

    def _post_status(self, node: dict) -> None:
        name = node["metadata"]["name"]
        now = _time()

        def condition(kind: str, ok: bool, reason: str, message: str) -> dict:
            return {"type": kind, "status": "True" if ok else "False", "reason": reason,
                    "message": message, "lastHeartbeatTime": now, "lastTransitionTime": now}

        status = {
            **node["status"],
            "conditions": [
                condition("Ready", True, "KubeletReady", "pollinate node agent is posting ready status"),
                condition("MemoryPressure", False, "KubeletHasSufficientMemory", "enough memory"),
                condition("DiskPressure", False, "KubeletHasNoDiskPressure", "no disk pressure"),
                condition("PIDPressure", False, "KubeletHasSufficientPID", "enough PIDs"),
            ],
            "addresses": [{"type": "InternalIP", "address": self.plan.gateway},
                          {"type": "Hostname", "address": name}],
            # Where the API server reaches "kubelet" for `kubectl logs`: kubelet_server.py.
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": KUBELET_VERSION,
                "containerRuntimeVersion": "pollinate-node-agent://0.1.0",
                "operatingSystem": "linux", "architecture": "amd64",
                "osImage": "pollinate testbed node agent", "kernelVersion": platform.release(),
                "machineID": "", "systemUUID": "", "bootID": "",
            },
        }
        # Transition times must not move on every heartbeat: keep those already posted.
        current = self.api.get(f"/api/v1/nodes/{name}").get("status", {}).get("conditions") or []
        since = {c["type"]: c for c in current}
        for c in status["conditions"]:
            old = since.get(c["type"])
            if old and old.get("status") == c["status"]:
                c["lastTransitionTime"] = old.get("lastTransitionTime", now)
        self.api.patch(f"/api/v1/nodes/{name}/status", {"status": status})

    def _renew_lease(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        try:
            self.api.patch(path, {"spec": {"renewTime": _micro_time(), "holderIdentity": name,
                                           "leaseDurationSeconds": LEASE_SECONDS}},
                           content_type=MERGE_PATCH)
        except ApiError as err:
            if not err.not_found:
                raise
            self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease", "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name, "uid": self.uids[name]}]},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS,
                         "renewTime": _micro_time()},
            })
