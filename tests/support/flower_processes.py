"""Real Flower processes on loopback for tests: a SuperLink with TLS and site authentication,
and sites joined with `pollinate-client join`, exactly as a laptop would."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import process_logs
from pollinate_operator import pki
from pollinate_operator.clients.flower import FlowerControl, FlowerUnavailable, RunState
from pollinate_runtime.run_config import RunConfig

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    process_logs.started(log)
    handle = open(log, "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    handle.close()
    return proc


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class _Stoppable:
    """A test's child process (and its process group), stopped gently or killed."""

    proc: subprocess.Popen | None

    def kill(self) -> None:
        if self.proc:
            _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc:
            _stop(self.proc)


@dataclass
class FlowerServer(_Stoppable):
    """A SuperLink on loopback with a CA and certificate from the operator's own PKI."""

    home: Path
    env: dict[str, str]
    auth: bool = True
    # The DNS names its certificate covers (pki adds IP 127.0.0.1, which Flower itself needs).
    server_names: tuple[str, ...] = ("localhost",)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    ca: pki.CertificateAuthority = field(default_factory=lambda: pki.new_ca("test federation CA"))
    started_runs: list[int] = field(default_factory=list)
    # What the operator presents to the control API (pollinate_runtime.server_gate).
    control_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # 0.0.0.0 lets a test call from a non-loopback address of this machine (another host's
    # view); sites and the operator still use 127.0.0.1.
    host: str = "127.0.0.1"
    # Its refusal counters (pollinate_runtime.server_metrics), as the server pod serves them.
    metrics_port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample the server's /metrics serves: (name, labels) -> value."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    @property
    def control_token_path(self) -> Path:
        return self.home / "control-token"

    @property
    def ca_path(self) -> Path:
        return self.home / "ca.crt"

    @property
    def log(self) -> Path:
        return self.home / "superlink.log"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.ca_path.exists():
            cert = pki.new_server_certificate(self.ca, list(self.server_names))
            self.ca_path.write_bytes(self.ca.cert_pem)
            (self.home / "tls.crt").write_bytes(cert.cert_pem)
            (self.home / "tls.key").write_bytes(cert.key_pem)
        self.control_token_path.write_text(self.control_token)
        self.control_token_path.chmod(0o600)
        argv = [str(BIN / "pollinate-superlink"), "--host", self.host, "--port", str(self.port),
                "--ssl-certfile", str(self.home / "tls.crt"), "--ssl-keyfile", str(self.home / "tls.key"),
                "--ssl-ca-certfile", str(self.ca_path), "--disable-runtime-dependency-installation",
                "--database", str(self.home / "state.db")]
        if self.auth:
            argv.append("--enable-supernode-auth")
        env = {**os.environ, **self.env, "FLWR_HOME": str(self.home / "flwr"),
               "POLLINATE_SERVER_LOG": str(self.home / "serverapp.log"),
               "POLLINATE_CONTROL_TOKEN_FILE": str(self.control_token_path),
               "POLLINATE_METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}",
               "PROMETHEUS_MULTIPROC_DIR": str(self.home / "metrics"),
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.proc = _spawn(argv, self.log, env)
        wait_for_port(self.port)


    def control(self) -> FlowerControl:
        return FlowerControl(self.address, self.ca_path.read_bytes(), self.control_token)

    def register(self, site: str, key_dir: Path) -> tuple[Path, str]:
        """A new site key, registered; returns the private key file and the node id."""
        key = pki.new_site_key()
        key_dir.mkdir(parents=True, exist_ok=True)
        path = key_dir / f"{site}.key"
        path.write_bytes(key.private_openssh)
        path.chmod(0o600)
        with self.control() as control:
            node_id = control.register_site(site, pki.public_key_pem(key.public_openssh))
        return path, node_id

    def start_run(self, config: RunConfig) -> int:
        with self.control() as control:
            run_id = control.start_run(config)
        self.started_runs.append(run_id)
        return run_id

    def stop_unfinished_runs(self) -> list[int]:
        """Stop every run started here that is still going (a test that failed mid-run must
        not leave its ServerApp waiting on the sites the next test shares); returns them."""
        stopped = []
        if self.proc is None or self.proc.poll() is not None:
            return stopped
        try:
            with self.control() as control:
                for run_id in self.started_runs:
                    state = control.get_run(run_id)
                    if state is not None and not state.finished:
                        control.stop_run(run_id)
                        stopped.append(run_id)
        except FlowerUnavailable:  # a server the test left down has no run to stop
            pass
        self.started_runs.clear()
        return stopped

    def wait_run(self, run_id: int, timeout: float) -> RunState:
        deadline = time.monotonic() + timeout
        state = None
        unavailable = None
        while time.monotonic() < deadline:
            try:
                with self.control() as control:
                    state = control.get_run(run_id)
            except FlowerUnavailable as err:  # a busy SuperLink's 500: ask again, as the operator does
                unavailable = err
                time.sleep(1.0)
                continue
            if state and state.finished:
                return state
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} not finished after {timeout} s (last: {state}; last "
                           f"error: {unavailable}); server log: {self.log}")


@dataclass
class Site(_Stoppable):
    name: str
    data: Path
    work: Path
    key: Path | None
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.work / "join.log"

    def join(self, server: FlowerServer, *extra: str,
             on: Callable[[list[str]], list[str]] | None = None) -> None:
        """Start `pollinate-client join`; `on` runs it elsewhere (an OutsideHost's command)."""
        self.work.mkdir(parents=True, exist_ok=True)
        argv = [str(BIN / "pollinate-client"), "join", "--server", server.address, "--site", self.name,
                "--data", str(self.data), "--ca", str(server.ca_path), "--work-dir", str(self.work),
                "--device", "cpu", "--verbose", *extra]
        if self.key:
            argv += ["--key", str(self.key)]
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
               # Two cores for four Python processes: keep torch from oversubscribing them.
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = _spawn(on(argv) if on else argv, self.log, env)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
