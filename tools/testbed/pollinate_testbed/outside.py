"""A machine outside the cluster, for tests that join from where a user's laptop would.

It is a network namespace of its own on the executing testbed's network (like a laptop on
the same LAN as the cluster's load balancer), in none of the nodes' pod ranges, whose only
resolver is a hosts file: it finds the Ingress's host name where a laptop's DNS would lead
it, and knows no in-cluster name.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

from .pod_network import NetworkPlan, PodSandbox

# Node pod ranges are 10.x.<n+1>.0/24 for a few nodes; this /24 is far above them.
OUTSIDE_SUBNET = 250


class OutsideHost:
    def __init__(self, plan: NetworkPlan, names: Mapping[str, str], number: int = 0) -> None:
        """`names` maps host names to addresses (what DNS would answer)."""
        address = plan.pod_cidr.network_address + OUTSIDE_SUBNET * 256 + 2 + number
        self.sandbox = PodSandbox(plan, f"out{number}{uuid.uuid4().hex}", str(address))
        self.hosts = "127.0.0.1\tlocalhost\n" + "".join(f"{a}\t{h}\n" for h, a in names.items())

    @property
    def address(self) -> str:
        return self.sandbox.address

    def start(self) -> OutsideHost:
        self.sandbox.create(self.hosts)
        return self

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` as run on this machine: its network, its hosts file."""
        return ["ip", "netns", "exec", self.sandbox.netns, *argv]

    def stop(self) -> None:
        self.sandbox.destroy()

    def __enter__(self) -> OutsideHost:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
