"""Readiness, liveness and startup probes, run by the agent as kubelet runs them.

httpGet and tcpSocket probes connect from the host to the pod's address (kubelet probes
from the node, not from inside the pod); HTTPS skips certificate verification, as kubelet
does. exec probes run the command inside the container's namespaces with its environment.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class ProbeSpec:
    kind: str  # "readiness", "liveness" or "startup"
    spec: dict
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3

    @classmethod
    def of(cls, kind: str, spec: dict | None) -> ProbeSpec | None:
        if not spec:
            return None
        return cls(
            kind, spec,
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
            period=float(spec.get("periodSeconds", 10)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            success_threshold=int(spec.get("successThreshold", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
        )


@dataclass
class ProbeState:
    """Counts consecutive results and says when the probe's verdict flips."""

    probe: ProbeSpec
    started_at: float
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0
    verdict: bool | None = None  # None until the thresholds decide
    last_message: str = field(default="")

    def __post_init__(self) -> None:
        self.next_at = self.started_at + self.probe.initial_delay

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, message: str, now: float) -> None:
        self.next_at = now + self.probe.period
        self.last_message = message
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= self.probe.success_threshold:
                self.verdict = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= self.probe.failure_threshold:
                self.verdict = False


def resolve_port(port: int | str, container: dict) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f'probe port "{port}" is not a named port of container "{container["name"]}"')


def run_probe(probe: ProbeSpec, container: dict, pod_ip: str, pid: int,
              env: dict[str, str]) -> tuple[bool, str]:
    """(succeeded, message) of one attempt."""
    spec = probe.spec
    try:
        if "httpGet" in spec:
            return _http(spec["httpGet"], container, pod_ip, probe.timeout)
        if "tcpSocket" in spec:
            port = resolve_port(spec["tcpSocket"]["port"], container)
            host = spec["tcpSocket"].get("host") or pod_ip
            with socket.create_connection((host, port), timeout=probe.timeout):
                return True, ""
        if "exec" in spec:
            return _exec(spec["exec"]["command"], pid, env, probe.timeout)
        if "grpc" in spec:
            port = resolve_port(spec["grpc"]["port"], container)
            # Without a gRPC health client here, a gRPC probe checks that the port accepts.
            with socket.create_connection((pod_ip, port), timeout=probe.timeout):
                return True, ""
    except (OSError, ValueError, ssl.SSLError, http.client.HTTPException) as err:
        return False, f"{probe.kind} probe failed: {err}"
    return False, f"{probe.kind} probe has no handler (httpGet, tcpSocket, exec or grpc)"


def _http(spec: dict, container: dict, pod_ip: str, timeout: float) -> tuple[bool, str]:
    port = resolve_port(spec["port"], container)
    host = spec.get("host") or pod_ip
    if spec.get("scheme", "HTTP").upper() == "HTTPS":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl._create_unverified_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"User-Agent": "kube-probe/1.35", "Accept": "*/*"}
    headers.update({h["name"]: h["value"] for h in spec.get("httpHeaders") or []})
    try:
        conn.request("GET", spec.get("path", "/"), headers=headers)
        response = conn.getresponse()
        response.read(10240)
    finally:
        conn.close()
    if 200 <= response.status < 400:
        return True, ""
    return False, f"HTTP probe failed with statuscode: {response.status}"


def _exec(command: list[str], pid: int, env: dict[str, str], timeout: float) -> tuple[bool, str]:
    t0 = time.monotonic()
    try:
        result = subprocess.run(
            ["nsenter", "--target", str(pid), "--net", "--mount", "--uts", "--", *command],
            env=env, capture_output=True, timeout=timeout, check=False, cwd="/",
        )
    except subprocess.TimeoutExpired:
        return False, f"command timed out after {time.monotonic() - t0:.1f}s"
    if result.returncode == 0:
        return True, ""
    output = (result.stdout + result.stderr).decode(errors="replace").strip()[-200:]
    return False, f"command exited {result.returncode}: {output}"
