"""The simulated machines of the local cluster: GPU nodes at three sites and one CPU node.

kwok owns these Node objects (by the `kwok.x-k8s.io/node: fake` annotation): it keeps them
Ready and moves pods bound to them through their lifecycle, so the real scheduler and
controllers see a cluster with GPUs it does not have.
"""

from __future__ import annotations

from dataclasses import dataclass

SITE_LABEL = "pollinate.dev/site"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class SimulatedSite:
    name: str
    gpu_product: str
    nodes: int = 2


SITES: tuple[SimulatedSite, ...] = (
    SimulatedSite("hospital-a", "NVIDIA-A100-SXM4-40GB"),
    SimulatedSite("hospital-b", "NVIDIA-L4"),
    SimulatedSite("clinic-c", "Tesla-T4"),
)
CPU_NODE = "cpu-0"


def node_manifest(name: str, labels: dict[str, str], capacity: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **labels,
            },
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def gpu_node_name(site: str, index: int) -> str:
    return f"gpu-{site}-{index}"


def cluster_nodes(sites: tuple[SimulatedSite, ...] = SITES) -> list[dict]:
    base = {"cpu": "8", "memory": "64Gi", "pods": "110", "ephemeral-storage": "200Gi"}
    nodes = [
        node_manifest(
            gpu_node_name(site.name, i),
            {SITE_LABEL: site.name, GPU_PRODUCT_LABEL: site.gpu_product},
            {**base, GPU_RESOURCE: "1"},
        )
        for site in sites
        for i in range(site.nodes)
    ]
    nodes.append(node_manifest(CPU_NODE, {"node-role.pollinate.dev/cpu": ""}, base))
    return nodes
