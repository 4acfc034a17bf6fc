"""What changes when the testbed executes pods instead of simulating them.

`Testbed.up(execute=True)` (or `pollinate-testbed up --execute`, or
POLLINATE_TESTBED_EXECUTE=1) starts the node agent (node_agent.py) in place of kwok's
nodes, and makes the API server and S3 reachable from pods:

- kube-apiserver listens on all addresses and advertises the pod bridge's address, so the
  `kubernetes` Service (KUBERNETES_SERVICE_HOST/PORT in every pod) leads to it; its serving
  certificate names that address and the Service's ClusterIP.
- MinIO listens on all addresses; the Service `s3` in `pollinate-system` (port 9000, no
  selector, an EndpointSlice naming the bridge address and MinIO's real port) makes it
  `http://s3.pollinate-system.svc:9000` from any pod.
- `kubectl logs` reaches the agent's kubelet API (kubelet_server.py) by the node's InternalIP.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .pod_network import NetworkPlan

ENV_FLAG = "POLLINATE_TESTBED_EXECUTE"
S3_NAMESPACE = "pollinate-system"
S3_SERVICE = "s3"
S3_SERVICE_PORT = 9000
IN_CLUSTER_S3_ENDPOINT = f"http://{S3_SERVICE}.{S3_NAMESPACE}.svc:{S3_SERVICE_PORT}"


def requested(execute: bool | None) -> bool:
    if execute is not None:
        return execute
    return os.environ.get(ENV_FLAG, "").lower() in ("1", "true", "yes")


def apiserver_certificate_ips(plan: NetworkPlan) -> tuple[str, ...]:
    return ("127.0.0.1", plan.kubernetes_service_ip, plan.gateway)


def apiserver_flags(plan: NetworkPlan) -> list[str]:
    return ["--bind-address=0.0.0.0", f"--advertise-address={plan.gateway}",
            f"--service-cluster-ip-range={plan.service_cidr}",
            # Node names resolve nowhere: reach the agent's kubelet API by address.
            "--kubelet-preferred-address-types=InternalIP,Hostname"]


def agent_command(kubeconfig: Path, agent_dir: Path, plan: NetworkPlan) -> list[str]:
    return [sys.executable, "-m", "pollinate_testbed.node_agent", "--kubeconfig", str(kubeconfig),
            "--state-dir", str(agent_dir), "--network-index", str(plan.index)]


def agent_path(bin_dir: Path) -> str:
    """Where pods' commands resolve: this Python environment, the testbed's binaries, the system."""
    return os.pathsep.join([str(Path(sys.executable).parent), str(bin_dir), os.environ.get("PATH", "")])


def s3_service_manifests(plan: NetworkPlan, s3_port: int) -> list[dict]:
    labels = {"app.kubernetes.io/name": "minio", "app.kubernetes.io/part-of": "pollinate-testbed"}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": S3_NAMESPACE}},
        {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": S3_SERVICE, "namespace": S3_NAMESPACE, "labels": labels},
            # No selector: the endpoint is MinIO on the host, named by the slice below.
            "spec": {"ports": [{"name": "s3", "port": S3_SERVICE_PORT, "targetPort": s3_port,
                                "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{S3_SERVICE}-host", "namespace": S3_NAMESPACE, "labels": {
                **labels, "kubernetes.io/service-name": S3_SERVICE,
                "endpointslice.kubernetes.io/managed-by": "pollinate-testbed"}},
            "addressType": "IPv4",
            "ports": [{"name": "s3", "port": s3_port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [plan.gateway], "conditions": {"ready": True}}],
        },
    ]
