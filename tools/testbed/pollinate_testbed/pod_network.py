"""Pod networking of the executing testbed: a Linux bridge on the host, and per pod a network
namespace joined to it by a veth pair, with its own address and hosts file.

    host: bridge pollinate<i> 10.244.0.1/16 ─┬─ veth ── netns pollinate<i>-<uid> eth0 10.244.1.2
                                             └─ veth ── netns pollinate<i>-<uid> eth0 10.244.2.2
          local route 10.96.0.0/16 dev lo  (Service ClusterIPs: see service_proxy.py)

Node n's pods take addresses from 10.244.<n+1>.0/24 (its spec.podCIDR) and all sit on one
/16 link, so pods reach each other and the host directly; the host reaches them through the
bridge. `i`, the network index, shifts every range so a second executing testbed (another
port offset) gets its own bridge and addresses.

Everything created here is named with the plan's prefixes, so `cleanup` can find and remove
what a killed agent left behind: processes are found through the namespace itself
(`ip netns pids`), which catches even those that left their process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NETNS_ETC = Path("/etc/netns")  # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts on /etc/hosts
LOCK_DIR = Path("/run/pollinate-testbed")
MAX_NETWORK_INDEX = 64


class NetworkError(RuntimeError):
    pass


@dataclass(frozen=True)
class NetworkPlan:
    """Names and address ranges of one executing testbed's network."""

    index: int = 0

    @classmethod
    def for_port_offset(cls, offset: int) -> NetworkPlan:
        return cls(index=(offset // 100) % MAX_NETWORK_INDEX)

    @property
    def bridge(self) -> str:
        return f"pollinate{self.index}"

    @property
    def pod_cidr(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{244 - self.index}.0.0/16")

    @property
    def service_cidr(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.{96 + self.index}.0.0/16")

    @property
    def gateway(self) -> str:
        """The bridge's address: the host as pods see it (API server, S3, proxied Services)."""
        return str(self.pod_cidr.network_address + 1)

    @property
    def kubernetes_service_ip(self) -> str:
        return str(self.service_cidr.network_address + 1)

    @property
    def netns_prefix(self) -> str:
        return f"pollinate{self.index}-"

    @property
    def veth_prefix(self) -> str:
        return f"plv{self.index}-"

    def node_pod_cidr(self, node_number: int) -> ipaddress.IPv4Network:
        base = self.pod_cidr.network_address + (node_number + 1) * 256
        return ipaddress.IPv4Network(f"{base}/24")


class NetworkLock:
    """Held by the agent that owns a plan's network for as long as it runs (the kernel drops
    it when the process dies), so no one cleans up a network another live agent uses."""

    def __init__(self, plan: NetworkPlan) -> None:
        self.path = LOCK_DIR / f"{plan.bridge}.lock"
        self._fd: int | None = None

    def acquire(self, owner: str) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NetworkError(f"the pod network {self.path.stem} is in use by another executing "
                               f"testbed ({self.holder()}): give this one another "
                               "POLLINATE_TESTBED_PORT_OFFSET") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, {owner}".encode())
        self._fd = fd

    def held_by_another(self) -> bool:
        if self._fd is not None or not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"


def ip(*args: str, stdin: str | None = None, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


class HostNetwork:
    """The host side: bridge, address, the local route for ClusterIPs, and cleanup."""

    def __init__(self, plan: NetworkPlan) -> None:
        self.plan = plan

    def create(self) -> None:
        p = self.plan
        if ip("link", "show", p.bridge, check=False):
            raise NetworkError(f"bridge {p.bridge} already exists: clean up first")
        ip("-batch", "-", stdin="\n".join([
            f"link add {p.bridge} type bridge",
            f"addr add {p.gateway}/{p.pod_cidr.prefixlen} dev {p.bridge}",
            f"link set {p.bridge} up",
            # Every ClusterIP is a local address of the host, so the Service proxy can bind
            # them (the "AnyIP" local route), for pods and host processes alike.
            f"route add local {p.service_cidr} dev lo table local",
        ]) + "\n")
        log.info("created bridge %s %s/%s, services %s", p.bridge, p.gateway,
                 p.pod_cidr.prefixlen, p.service_cidr)

    def cleanup(self) -> list[str]:
        """Remove every namespace, veth, process and route of this plan; return what went."""
        p = self.plan
        removed: list[str] = []
        for ns in self.namespaces():
            kill_namespace_processes(ns)
            ip("netns", "delete", ns, check=False)
            removed.append(f"netns {ns}")
        for link in self._links():
            if link.startswith(p.veth_prefix) or link == p.bridge:
                ip("link", "delete", link, check=False)
                removed.append(f"link {link}")
        if str(p.service_cidr) in ip("route", "show", "table", "local", check=False):
            ip("route", "delete", "local", str(p.service_cidr), "dev", "lo", "table", "local",
               check=False)
            removed.append(f"route local {p.service_cidr}")
        if NETNS_ETC.exists():
            for d in NETNS_ETC.glob(f"{p.netns_prefix}*"):
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()
        if removed:
            log.info("network cleanup removed: %s", ", ".join(removed))
        return removed

    def namespaces(self) -> list[str]:
        names = [line.split()[0] for line in ip("netns", "list", check=False).splitlines() if line]
        return [n for n in names if n.startswith(self.plan.netns_prefix)]

    def veths(self) -> list[str]:
        return [link for link in self._links() if link.startswith(self.plan.veth_prefix)]

    def bridge_exists(self) -> bool:
        return self.plan.bridge in self._links()

    @staticmethod
    def _links() -> list[str]:
        names = []
        for line in ip("-o", "link", "show", check=False).splitlines():
            # "7: plv0-1a2b3c4d@if2: <BROADCAST,..." -> "plv0-1a2b3c4d"
            names.append(line.split(":", 2)[1].strip().split("@")[0])
        return names


def kill_namespace_processes(netns: str, sig: int = signal.SIGKILL) -> list[int]:
    pids = [int(p) for p in ip("netns", "pids", netns, check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


class AddressPool:
    """Addresses of one node's pod CIDR, handed out lowest first and given back on teardown."""

    def __init__(self, cidr: ipaddress.IPv4Network) -> None:
        # .0 is the network, .1 would look like a gateway, .255 is broadcast in a /24.
        self._free = [str(a) for a in list(cidr.hosts())[1:]]
        self._free.reverse()

    def take(self) -> str:
        if not self._free:
            raise NetworkError("no free pod address left on this node")
        return self._free.pop()

    def give_back(self, address: str) -> None:
        self._free.append(address)
        self._free.sort(key=lambda a: ipaddress.IPv4Address(a), reverse=True)


@dataclass
class PodSandbox:
    """One pod's network namespace: created before its containers, deleted after them."""

    plan: NetworkPlan
    pod_uid: str
    address: str

    @property
    def netns(self) -> str:
        return f"{self.plan.netns_prefix}{self.pod_uid[:8]}"

    @property
    def veth(self) -> str:
        return f"{self.plan.veth_prefix}{self.pod_uid[:8]}"

    @property
    def hosts_file(self) -> Path:
        return NETNS_ETC / self.netns / "hosts"

    def create(self, hosts: str) -> None:
        p = self.plan
        t0 = time.monotonic()
        ip("netns", "add", self.netns)
        ip("-batch", "-", stdin="\n".join([
            f"link add {self.veth} type veth peer name eth0 netns {self.netns}",
            f"link set {self.veth} master {p.bridge}",
            f"link set {self.veth} up",
        ]) + "\n")
        ip("-n", self.netns, "-batch", "-", stdin="\n".join([
            "link set lo up",
            f"addr add {self.address}/{p.pod_cidr.prefixlen} dev eth0",
            "link set eth0 up",
            f"route add default via {p.gateway}",
        ]) + "\n")
        self.hosts_file.parent.mkdir(parents=True, exist_ok=True)
        # No nameserver: names come from the hosts file, and a miss fails at once (the
        # resolver tries 127.0.0.1 in the pod's namespace, where nothing listens).
        (self.hosts_file.parent / "resolv.conf").write_text("options ndots:1 attempts:1 timeout:1\n")
        self.write_hosts(hosts)
        log.debug("sandbox %s %s ready in %.0f ms", self.netns, self.address,
                  (time.monotonic() - t0) * 1000)

    def write_hosts(self, hosts: str) -> None:
        # In place, never by rename: running containers see this file through a bind mount
        # of its inode, and a renamed file would leave them with the old one.
        path = self.hosts_file
        if path.exists() and path.read_text() == hosts:
            return
        with open(path, "a+") as f:
            f.seek(0)
            f.truncate()
            f.write(hosts)

    def processes(self) -> list[int]:
        return [int(p) for p in ip("netns", "pids", self.netns, check=False).split()]

    def destroy(self) -> None:
        kill_namespace_processes(self.netns)
        ip("netns", "delete", self.netns, check=False)
        ip("link", "delete", self.veth, check=False)  # usually gone with the namespace already
        d = self.hosts_file.parent
        if d.exists():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
