"""Services for the executing testbed: names in every pod's hosts file, and a kube-proxy.

Names: a pod's hosts file maps `<svc>` (its own namespace), `<svc>.<ns>`, `<svc>.<ns>.svc`
and `<svc>.<ns>.svc.cluster.local` to the Service's ClusterIP; for a headless Service, to the
ready endpoints' addresses, as cluster DNS would answer.

Traffic: kube-proxy's userspace mode. This machine has the kernel's nf_tables and NAT but
neither the `iptables` nor the `nft` program, so instead of DNAT rules the proxy listens on
every ClusterIP:port itself (all of the service range is a local address of the host, see
pod_network.py) and copies each TCP connection to a ready endpoint from the Service's
EndpointSlices, translating port to targetPort. It needs no packages, and connections from
a pod to a Service it backs itself (hairpin) just work. What it gives up: the backend sees
the bridge address as the client, and only TCP is proxied (no UDP: there is no DNS server).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CLUSTER_DOMAIN = "cluster.local"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
COPY_CHUNK = 256 * 1024
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    protocol: str


@dataclass
class ServiceEntry:
    namespace: str
    name: str
    cluster_ip: str | None  # None for a headless Service
    ports: list[ServicePort]
    # EndpointSlice name -> that slice's ready endpoints as (address, {port name: port}).
    slices: dict[str, list[tuple[str, dict[str, int]]]] = field(default_factory=dict)

    def ready_endpoints(self, port_name: str) -> list[tuple[str, int]]:
        found = []
        for endpoints in self.slices.values():
            for address, ports in endpoints:
                if port_name in ports:
                    found.append((address, ports[port_name]))
        return sorted(set(found))

    def ready_addresses(self) -> list[str]:
        return sorted({a for endpoints in self.slices.values() for a, _ in endpoints})


def dns_names(name: str, namespace: str, own_namespace: bool) -> list[str]:
    names = [f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"]
    return ([name] if own_namespace else []) + names


class ServiceTable:
    """Services and their ready endpoints, fed by the agent's watches; thread safe."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._services: dict[tuple[str, str], ServiceEntry] = {}
        # Slices may arrive before their Service: keep them until it does.
        self._slices: dict[tuple[str, str], dict[str, list[tuple[str, dict[str, int]]]]] = {}
        self._on_change = on_change

    def on_service(self, event_type: str, svc: dict) -> None:
        meta, spec = svc["metadata"], svc.get("spec", {})
        key = (meta["namespace"], meta["name"])
        with self._lock:
            if event_type == "DELETED":
                self._services.pop(key, None)
            else:
                ip = spec.get("clusterIP")
                self._services[key] = ServiceEntry(
                    namespace=key[0], name=key[1],
                    cluster_ip=None if ip in (None, "", "None") else ip,
                    ports=[ServicePort(p.get("name", ""), p["port"], p.get("protocol", "TCP"))
                           for p in spec.get("ports", [])],
                    slices=self._slices.setdefault(key, {}),
                )
        self._on_change()

    def on_endpoint_slice(self, event_type: str, eps: dict) -> None:
        meta = eps["metadata"]
        service = meta.get("labels", {}).get(SERVICE_NAME_LABEL)
        if not service or eps.get("addressType", "IPv4") != "IPv4":
            return
        key = (meta["namespace"], service)
        ready: list[tuple[str, dict[str, int]]] = []
        if event_type != "DELETED":
            ports = {p.get("name", "") or "": p["port"] for p in eps.get("ports") or [] if "port" in p}
            for endpoint in eps.get("endpoints") or []:
                conditions = endpoint.get("conditions", {})
                # A nil `ready` means ready (the API's own rule); terminating ones take no new work.
                if conditions.get("ready") is False or conditions.get("terminating"):
                    continue
                ready += [(address, ports) for address in endpoint.get("addresses", [])]
        with self._lock:
            slices = self._slices.setdefault(key, {})
            if event_type == "DELETED":
                slices.pop(meta["name"], None)
            else:
                slices[meta["name"]] = ready
        self._on_change()

    def entries(self) -> list[ServiceEntry]:
        with self._lock:
            return list(self._services.values())

    def get(self, namespace: str, name: str) -> ServiceEntry | None:
        with self._lock:
            return self._services.get((namespace, name))

    def host_entries(self, namespace: str) -> list[tuple[str, list[str]]]:
        """(address, names) lines for the hosts file of a pod in `namespace`."""
        lines = []
        for svc in sorted(self.entries(), key=lambda s: (s.namespace, s.name)):
            names = dns_names(svc.name, svc.namespace, svc.namespace == namespace)
            addresses = [svc.cluster_ip] if svc.cluster_ip else svc.ready_addresses()
            lines += [(address, names) for address in addresses]
        return lines

    def environment(self, namespace: str) -> dict[str, str]:
        """The Docker-link style variables kubelet gives a pod for each Service of its
        namespace (enableServiceLinks), plus KUBERNETES_SERVICE_* for the API server."""
        env: dict[str, str] = {}
        for svc in self.entries():
            if not svc.cluster_ip or not svc.ports:
                continue
            is_master = (svc.namespace, svc.name) == ("default", "kubernetes")
            if svc.namespace != namespace and not is_master:
                continue
            prefix = svc.name.upper().replace("-", "_")
            first = svc.ports[0]
            env[f"{prefix}_SERVICE_HOST"] = svc.cluster_ip
            env[f"{prefix}_SERVICE_PORT"] = str(first.port)
            env[f"{prefix}_PORT"] = f"{first.protocol.lower()}://{svc.cluster_ip}:{first.port}"
            for port in svc.ports:
                if port.name:
                    env[f"{prefix}_SERVICE_PORT_{port.name.upper().replace('-', '_')}"] = str(port.port)
                proto = port.protocol.upper()
                base = f"{prefix}_PORT_{port.port}_{proto}"
                env[base] = f"{port.protocol.lower()}://{svc.cluster_ip}:{port.port}"
                env[f"{base}_PROTO"] = port.protocol.lower()
                env[f"{base}_PORT"] = str(port.port)
                env[f"{base}_ADDR"] = svc.cluster_ip
        return env


class ServiceProxy:
    """Listens on each ClusterIP:port and forwards connections to ready endpoints."""

    def __init__(self, table: ServiceTable) -> None:
        self.table = table
        self._loop = asyncio.new_event_loop()
        self._servers: dict[tuple[str, int], asyncio.base_events.Server] = {}
        self._round_robin: dict[tuple[str, int], itertools.count] = {}
        self._sync_lock: asyncio.Lock | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="service-proxy",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        async def close_all() -> None:
            for server in self._servers.values():
                server.close()
            self._servers.clear()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def sync(self) -> None:
        """Open listeners for new Service ports and close those of removed ones."""
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._sync(), self._loop)

    async def _sync(self) -> None:
        # One sync at a time: two racing to bind the same ClusterIP:port would fail.
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            await self._sync_listeners()

    async def _sync_listeners(self) -> None:
        wanted: dict[tuple[str, int], tuple[str, str, str]] = {}
        for svc in self.table.entries():
            if not svc.cluster_ip:
                continue
            for port in svc.ports:
                if port.protocol.upper() == "TCP":
                    wanted[(svc.cluster_ip, port.port)] = (svc.namespace, svc.name, port.name)
        for key in set(self._servers) - set(wanted):
            self._servers.pop(key).close()
        for key, target in wanted.items():
            if key in self._servers:
                continue
            try:
                self._servers[key] = await asyncio.start_server(
                    self._handler(*target, key), host=key[0], port=key[1], reuse_address=True)
                log.debug("proxying %s:%d for service %s/%s", key[0], key[1], target[0], target[1])
            except OSError as err:
                log.error("cannot listen on %s:%d for service %s/%s: %s",
                          key[0], key[1], target[0], target[1], err)

    def _handler(self, namespace: str, name: str, port_name: str, key: tuple[str, int]):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            svc = self.table.get(namespace, name)
            endpoints = svc.ready_endpoints(port_name) if svc else []
            if not endpoints:
                log.info("service %s/%s port %s has no ready endpoint: closing a connection",
                         namespace, name, port_name or key[1])
                writer.close()
                return
            # Round robin, trying the next endpoint when one refuses.
            start = next(self._round_robin.setdefault(key, itertools.count()))
            for i in range(len(endpoints)):
                address, port = endpoints[(start + i) % len(endpoints)]
                try:
                    up_reader, up_writer = await asyncio.wait_for(
                        asyncio.open_connection(address, port), CONNECT_TIMEOUT)
                    break
                except (OSError, TimeoutError) as err:
                    log.info("service %s/%s endpoint %s:%d failed: %s", namespace, name, address, port, err)
            else:
                writer.close()
                return
            try:
                await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
            finally:
                up_writer.close()
                writer.close()

        return handle


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(COPY_CHUNK):
            writer.write(data)
            await writer.drain()
        # Half-close: the other direction may still be talking (HTTP/1.0, TLS close_notify).
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
