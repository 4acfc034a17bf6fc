"""The node agent: kubelet and kube-proxy for the executing testbed (the virtual-kubelet pattern).

kwok only pretends to run pods. This agent owns a set of Node objects and really runs the
pods the scheduler binds to them, as local processes: only the container runtime is
replaced (images are ignored, commands resolve on the agent's PATH); manifests, scheduling,
Services, volumes, probes and status are the real thing.

    pollinate-node-agent --kubeconfig K --state-dir .testbed/agent [--network-index 0] [--nodes a,b]

What lives where (under --state-dir, `.testbed/agent/` for `make up`):
    logs/<namespace>_<pod>_<uid>/<container>/<restart>.log   every container run's output,
                                                              also via `kubectl logs [-f] [-p]`
    pods/<uid>/volumes/<volume>/                              Secrets, ConfigMaps, emptyDirs...
    claims/<namespace>/<claim>/                               persistentVolumeClaims
    host-mountpoints                                          mount points made on the host
The agent's own log (JSON lines) is the Testbed's `logs/node-agent.log`.

Networking (pod_network.py), Services (service_proxy.py), container processes
(pod_runtime.py) and a pod's life (pod_worker.py) each have their own module.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .agent_nodes import NodeHeartbeat, executed_nodes
from .kube_api import Credentials, Informer, KubeApi
from .kubelet_server import KubeletServer, kubelet_port
from .pod_network import AddressPool, HostNetwork, NetworkError, NetworkLock, NetworkPlan
from .pod_runtime import HostMountpoints
from .pod_worker import PodWorker, container_log
from .service_proxy import ServiceProxy, ServiceTable

log = logging.getLogger("pollinate_testbed.node_agent")

HOSTS_HEADER = """# Kubernetes-managed hosts file (pollinate node agent).
127.0.0.1\tlocalhost
::1\tlocalhost ip6-localhost ip6-loopback
fe00::0\tip6-localnet
fe00::0\tip6-mcastprefix
fe00::1\tip6-allnodes
fe00::2\tip6-allrouters
"""


class NodeAgent:
    def __init__(self, kubeconfig: Path, agent_dir: Path, plan: NetworkPlan,
                 node_names: set[str] | None = None) -> None:
        self.agent_dir = agent_dir
        self.plan = plan
        self.stop = threading.Event()
        agent_dir.mkdir(parents=True, exist_ok=True)
        self.api = KubeApi(Credentials.from_kubeconfig(kubeconfig, agent_dir / "credentials"))
        self.network = HostNetwork(plan)
        self.nodes = executed_nodes(plan, node_names)
        self.node_names = {n["metadata"]["name"] for n in self.nodes}
        self.heartbeat = NodeHeartbeat(self.api, plan, self.nodes, self.stop, kubelet_port(plan.index))
        self.services = ServiceTable(on_change=self._services_changed)
        self.proxy = ServiceProxy(self.services)
        self.mountpoints = HostMountpoints(agent_dir / "host-mountpoints")
        self.inherited_env = dict(os.environ)
        self._pools = {n["metadata"]["name"]: AddressPool(ipaddress.IPv4Network(n["spec"]["podCIDR"]))
                       for n in self.nodes}
        self._lock = threading.Lock()
        self._workers: dict[str, PodWorker] = {}
        self._finished: set[str] = set()  # pods whose worker ended while the object lingers
        self._sandboxes: dict[str, PodWorker] = {}  # running sandboxes, for hosts rewrites
        self._threads: list[threading.Thread] = []

    # ---- lifecycle -------------------------------------------------------------------
    def run(self) -> None:
        t0 = time.monotonic()
        NetworkLock(self.plan).acquire(owner=f"state dir {self.agent_dir}")
        self.network.cleanup()  # whatever a killed agent of this plan left behind
        self.mountpoints.remove_empty()
        self.network.create()
        self.kubelet_api = KubeletServer(self.plan.gateway, kubelet_port(self.plan.index),
                                         self.agent_dir / "pki", self.locate_log)
        self.kubelet_api.start()
        self.proxy.start()
        self.heartbeat.register()
        informers = [
            Informer(self.api, "/api/v1/services", self.services.on_service, self.stop),
            Informer(self.api, "/apis/discovery.k8s.io/v1/endpointslices",
                     self.services.on_endpoint_slice, self.stop),
        ]
        self._spawn("heartbeat", self.heartbeat.run)
        for informer in informers:
            self._spawn(f"watch {informer.path}", informer.run)
        for informer in informers:
            # Pods need KUBERNETES_SERVICE_HOST and the Services' names from the first start.
            informer.synced.wait(30)
        pods = Informer(self.api, "/api/v1/pods", self._on_pod, self.stop)
        self._spawn("watch pods", pods.run)
        log.info("node agent ready in %.1f s: nodes %s, bridge %s %s, pods %s, services %s",
                 time.monotonic() - t0, ", ".join(sorted(self.node_names)), self.plan.bridge,
                 self.plan.gateway, self.plan.pod_cidr, self.plan.service_cidr)
        self.stop.wait()
        self._shutdown()

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _shutdown(self) -> None:
        log.info("node agent stopping: killing %d pods", len(self._workers))
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.shutdown()
        for worker in workers:
            worker.join(timeout=5)
        self.proxy.stop()
        self.kubelet_api.stop()
        self.network.cleanup()
        self.mountpoints.remove_empty()
        log.info("node agent stopped")

    # ---- pods ------------------------------------------------------------------------
    def _on_pod(self, event_type: str, pod: dict) -> None:
        if pod["spec"].get("nodeName") not in self.node_names:
            return
        uid = pod["metadata"]["uid"]
        with self._lock:
            worker = self._workers.get(uid)
            if event_type == "DELETED":
                self._finished.discard(uid)
                if worker is not None:
                    worker.removed()
                return
            if worker is not None:
                worker.update(pod)
                return
            if uid in self._finished:
                return
            worker = PodWorker(self, pod)
            self._workers[uid] = worker
        log.info("pod %s/%s on %s (%s): taking it over", pod["metadata"]["namespace"],
                 pod["metadata"]["name"], pod["spec"]["nodeName"],
                 pod.get("status", {}).get("phase", "Pending"))
        worker.start()

    def worker_finished(self, worker: PodWorker) -> None:
        with self._lock:
            self._workers.pop(worker.uid, None)
            if not worker.gone:
                self._finished.add(worker.uid)

    def locate_log(self, namespace: str, pod: str, container: str, previous: bool):
        """The log file of a container's current (or previous) run, for `kubectl logs`."""
        with self._lock:
            worker = next((w for w in self._workers.values() if w.ref == f"{namespace}/{pod}"), None)
        if worker is not None:
            run = next((c for c in worker.init + worker.main if c.name == container), None)
            if run is None:
                return None
            restart = run.restart_count - (1 if previous else 0)
            if restart < 0:
                return None
            path = container_log(self.agent_dir, worker.pod, container, restart)
            return path, lambda: run.process is not None and not previous
        # A pod this agent no longer tracks: its newest log folder, if any is left.
        folders = sorted((self.agent_dir / "logs").glob(f"{namespace}_{pod}_*/{container}"),
                         key=lambda d: d.stat().st_mtime)
        if not folders:
            return None
        runs = sorted(folders[-1].glob("*.log"), key=lambda f: int(f.stem))
        chosen = runs[-2:-1] if previous else runs[-1:]
        return (chosen[0], lambda: False) if chosen else None

    # ---- what workers ask for --------------------------------------------------------
    def take_address(self, node: str) -> str:
        with self._lock:
            return self._pools[node].take()

    def give_back_address(self, node: str, address: str) -> None:
        with self._lock:
            self._pools[node].give_back(address)

    def node_allocatable(self, node: str) -> dict[str, str]:
        return next(n["status"]["allocatable"] for n in self.nodes if n["metadata"]["name"] == node)

    def service_environment(self, namespace: str) -> dict[str, str]:
        return self.services.environment(namespace)

    def hosts_content(self, pod: dict, address: str) -> str:
        meta, spec = pod["metadata"], pod["spec"]
        hostname = spec.get("hostname") or meta["name"]
        own = [hostname]
        if spec.get("subdomain"):
            own.insert(0, f"{hostname}.{spec['subdomain']}.{meta['namespace']}.svc.cluster.local")
        lines = [HOSTS_HEADER, f"{address}\t{' '.join(own)}\n"]
        for alias in spec.get("hostAliases") or []:
            lines.append(f"{alias['ip']}\t{' '.join(alias.get('hostnames', []))}\n")
        lines.append("# Services\n")
        for ip, names in self.services.host_entries(meta["namespace"]):
            lines.append(f"{ip}\t{' '.join(names)}\n")
        return "".join(lines)

    def sandbox_ready(self, worker: PodWorker) -> None:
        with self._lock:
            self._sandboxes[worker.uid] = worker

    def sandbox_gone(self, worker: PodWorker) -> None:
        with self._lock:
            self._sandboxes.pop(worker.uid, None)

    def _services_changed(self) -> None:
        self.proxy.sync()
        with self._lock:
            running = list(self._sandboxes.values())
        for worker in running:
            sandbox = worker.sandbox
            if sandbox is not None:
                try:
                    sandbox.write_hosts(self.hosts_content(worker.pod, sandbox.address))
                except OSError as err:  # the sandbox went away meanwhile
                    log.debug("hosts of %s not rewritten: %s", worker.ref, err)


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pollinate-node-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--network-index", type=int, default=0)
    parser.add_argument("--nodes", default="", help="comma-separated node names (default: all)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if os.geteuid() != 0:
        log.error("the node agent needs root: it creates network namespaces and bind mounts")
        return 1
    names = {n for n in args.nodes.split(",") if n} or None
    agent = NodeAgent(args.kubeconfig, args.state_dir.resolve(), NetworkPlan(args.network_index), names)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    try:
        agent.run()
    except NetworkError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
