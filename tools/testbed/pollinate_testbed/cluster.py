"""Start, find and stop the local control plane and S3 server.

Every component is the real program (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok, MinIO) run as a local process in its own session, so a cluster started
by `make up` outlives the command and is reused by tests that find it running.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from . import execute_mode, ingress_controller, pki
from .nodes import cluster_nodes
from .pod_network import HostNetwork, NetworkLock, NetworkPlan
from .pod_runtime import HostMountpoints
from .pod_volumes import claim_dir

BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "build.sh"
S3_BUCKET = "pollinate"


class TestbedError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ports:
    # Below Linux's ephemeral range (32768-60999), so no outgoing connection can hold them.
    etcd: int = 22379
    etcd_peer: int = 22380
    apiserver: int = 26443
    s3: int = 29000
    s3_console: int = 29001
    ingress_ping: int = 29080  # the ingress controller's health; it serves HTTPS on <bridge>:443

    @classmethod
    def from_env(cls) -> Ports:
        """Shifted by $POLLINATE_TESTBED_PORT_OFFSET, so two clusters can run side by side."""
        offset = int(os.environ.get("POLLINATE_TESTBED_PORT_OFFSET", "0"))
        return cls(**{k: v + offset for k, v in asdict(cls()).items()})


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "POLLINATE_S3_ENDPOINT": self.endpoint,
            "POLLINATE_S3_BUCKET": self.bucket,
        }


def default_state_dir() -> Path:
    """$POLLINATE_TESTBED_DIR, else .testbed at the top of the clone this package runs from
    (so every command finds the same cluster whatever its working directory); a cluster on
    shifted ports ($POLLINATE_TESTBED_PORT_OFFSET) gets .testbed-<offset>, so that it never
    takes over, or stops, the processes of the one beside it."""
    if explicit := os.environ.get("POLLINATE_TESTBED_DIR"):
        return Path(explicit).resolve()
    offset = int(os.environ.get("POLLINATE_TESTBED_PORT_OFFSET", "0"))
    name = ".testbed" if offset == 0 else f".testbed-{offset}"
    clone = Path(__file__).resolve().parents[3]
    if (clone / "tools" / "testbed" / "build.sh").exists():
        return clone / name
    return (Path.cwd() / name).resolve()


def build_binaries(ingress: bool = True) -> Path:
    """Build (or find in the cache) the Go binaries and return their directory: the control
    plane, S3 and helm, and with `ingress` Traefik too (only execute mode runs it)."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "all" if ingress else "core"], check=False,
        stdout=subprocess.PIPE, text=True,
    )
    if result.returncode != 0:
        raise TestbedError(f"building the testbed binaries failed (exit {result.returncode})")
    return Path(result.stdout.strip().splitlines()[-1])


class Testbed:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, state_dir: Path | None = None, ports: Ports | None = None) -> None:
        self.state_dir = state_dir or default_state_dir()
        self.ports = ports or Ports.from_env()
        self.pki_dir = self.state_dir / "pki"
        self.log_dir = self.state_dir / "logs"
        self.pid_dir = self.state_dir / "pids"
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.s3_file = self.state_dir / "s3.json"
        self.bin_file = self.state_dir / "bin-dir"
        # Execute mode (execute_mode.py): the node agent runs pods for real.
        self.agent_dir = self.state_dir / "agent"
        self.execute_marker = self.state_dir / "execute"
        self.network = NetworkPlan.for_port_offset(self.ports.apiserver - Ports().apiserver)

    # ---- discovery -------------------------------------------------------------------
    @property
    def bin_dir(self) -> Path:
        return Path(self.bin_file.read_text().strip())

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    def s3(self) -> S3Settings:
        return S3Settings(**json.loads(self.s3_file.read_text()))

    def env(self) -> dict[str, str]:
        """Environment for a process that should use this cluster and S3 server."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            **self.s3().env(),
        }

    @property
    def executing(self) -> bool:
        """Started in execute mode: pods really run (node agent) instead of being simulated."""
        return self.execute_marker.exists()

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The folder a persistentVolumeClaim is in execute mode: put a site's data here."""
        return claim_dir(self.agent_dir, namespace, claim)

    def is_running(self) -> bool:
        if not (self.kubeconfig.exists() and self.s3_file.exists() and self.bin_file.exists()):
            return False
        return self._apiserver_ready() and self._s3_ready()

    # ---- lifecycle -------------------------------------------------------------------
    def up(self, log=print, execute: bool | None = None) -> None:
        """Start (or find running) the cluster; `execute` (default $POLLINATE_TESTBED_EXECUTE)
        has the node agent run pods as local processes instead of kwok simulating them."""
        execute = execute_mode.requested(execute)
        if self.is_running():
            if execute != self.executing:
                mode = "execute" if self.executing else "simulate"
                raise TestbedError(
                    f"the testbed in {self.state_dir} runs in {mode} mode, but "
                    f"{'execute' if execute else 'simulate'} mode was asked for "
                    f"(${execute_mode.ENV_FLAG}); stop it first with `make down`")
            log(f"testbed already running: KUBECONFIG={self.kubeconfig}")
            return
        self.down(quiet=True)
        t0 = time.monotonic()
        bin_dir = build_binaries(ingress=execute)
        for d in (self.pki_dir, self.log_dir, self.pid_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.bin_file.write_text(str(bin_dir))
        if execute:
            lock = NetworkLock(self.network)
            if lock.held_by_another():
                raise TestbedError(f"pod network {self.network.bridge} is in use by another executing "
                                   f"testbed ({lock.holder()}): set another POLLINATE_TESTBED_PORT_OFFSET")
            self.execute_marker.write_text(f"network index {self.network.index}\n")
        self._write_pki()
        self._start_etcd()
        self._start_apiserver()
        self._wait(self._apiserver_ready, "kube-apiserver", 90)
        self._start_controllers()
        self._start_kwok()
        self._start_s3()
        self._wait(self._s3_ready, "minio", 60)
        self._create_bucket()
        if self.executing:
            self._start_node_agent()
        else:
            self._create_nodes()
        self._wait(self._default_service_account_exists, "default ServiceAccount", 60)
        self._wait(self._nodes_ready, "simulated nodes Ready", 60)
        if self.executing:
            self._start_ingress_controller()
            self._wait(self._ingress_controller_ready, "ingress controller", 60)
        log(f"testbed up in {time.monotonic() - t0:.1f} s: KUBECONFIG={self.kubeconfig}")

    def down(self, quiet: bool = False) -> None:
        if self.pid_dir.exists():
            _stop_all([int(p.read_text()) for p in self.pid_dir.glob("*.pid")])
        if self.executing and not NetworkLock(self.network).held_by_another():
            # What a killed node agent could not clean: pod processes, namespaces, bridge.
            HostNetwork(self.network).cleanup()
            HostMountpoints(self.agent_dir / "host-mountpoints").remove_empty()
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        if not quiet:
            print(f"testbed stopped; removed {self.state_dir}")

    # ---- components ------------------------------------------------------------------
    def _write_pki(self) -> None:
        d = self.pki_dir
        ca = pki.make_ca(d)
        pki.issue(
            ca, d, "apiserver", "kube-apiserver", server=True,
            dns_names=("localhost", "kubernetes", "kubernetes.default",
                       "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
            ip_addresses=(execute_mode.apiserver_certificate_ips(self.network) if self.executing
                          else ("127.0.0.1", "10.96.0.1")),
        )
        admin = pki.issue(ca, d, "admin", "pollinate-admin", organization="system:masters")
        pki.make_service_account_keys(d)
        self.kubeconfig.write_text(
            yaml.safe_dump(kubeconfig(self.server, ca.cert, admin, "pollinate-testbed"))
        )
        self.kubeconfig.chmod(0o600)

    def restart_apiserver(self, downtime: float = 0.0) -> None:
        """Stop kube-apiserver, wait `downtime` seconds, start it again: for tests that its
        clients reconnect. etcd keeps the cluster's state meanwhile."""
        pid_file = next(self.pid_dir.glob("*-kube-apiserver.pid"))
        _stop_all([int(pid_file.read_text())])
        time.sleep(downtime)
        self._start_apiserver()
        self._wait(self._apiserver_ready, "kube-apiserver", 90)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log_file = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **(env or {})}, cwd=self.state_dir,
        )
        log_file.close()
        # The numeric prefix keeps stop order the reverse of start order (a restarted
        # component keeps its place).
        existing = list(self.pid_dir.glob(f"*-{name}.pid"))
        pid_file = existing[0] if existing else (
            self.pid_dir / f"{len(list(self.pid_dir.glob('*.pid'))):02d}-{name}.pid")
        pid_file.write_text(str(proc.pid))
        time.sleep(0.2)
        if proc.poll() is not None:
            raise TestbedError(f"{name} exited at once; see {self.log_dir / (name + '.log')}")

    def _start_etcd(self) -> None:
        p = self.ports
        self._spawn("etcd", [
            str(self.bin_dir / "etcd"), "--name", "testbed",
            "--data-dir", str(self.state_dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{p.etcd}",
            "--advertise-client-urls", f"http://127.0.0.1:{p.etcd}",
            "--listen-peer-urls", f"http://127.0.0.1:{p.etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p.etcd_peer}",
            "--initial-cluster", f"testbed=http://127.0.0.1:{p.etcd_peer}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(4 * 1024**3),
            "--log-level", "warn",
        ])

    def _start_apiserver(self) -> None:
        d = self.pki_dir
        network_flags = (execute_mode.apiserver_flags(self.network) if self.executing
                         else ["--bind-address=127.0.0.1", "--service-cluster-ip-range=10.96.0.0/16"])
        self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.ports.etcd}",
            *network_flags,
            f"--secure-port={self.ports.apiserver}",
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'pollinate-testbed-ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--profiling=false",
        ])

    def _start_controllers(self) -> None:
        d, kc = self.pki_dir, str(self.kubeconfig)
        self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={kc}",
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={d / 'pollinate-testbed-ca.crt'}",
            "--use-service-account-credentials=true",
            # Simulated nodes heartbeat from one busy process (kwok, or the node agent): a late
            # beat must not flip them NotReady, since kwok does not mark their pods Ready again
            # as a kubelet would. At 1,000 nodes on 2 loaded cores the leases lapsed for more
            # than 300 s (bench/operator_scale.py), and every pod on them lost its Ready
            # condition for good. The controller itself must stay: it lifts the not-ready taint
            # the API server puts on every new node. Nothing here tests node failure.
            "--node-monitor-grace-period=3600s",
            "--leader-elect=false", "--secure-port=0",
        ])
        self._spawn("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"),
            f"--kubeconfig={kc}", "--leader-elect=false", "--secure-port=0",
        ])

    def _start_kwok(self) -> None:
        self._spawn("kwok", [
            str(self.bin_dir / "kwok"),
            f"--kubeconfig={self.kubeconfig}",
            f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.244.0.0/16", "--node-ip=10.0.0.1",
            "--server-address=127.0.0.1:0",
        ])

    def _start_s3(self) -> None:
        settings = S3Settings(
            endpoint=f"http://127.0.0.1:{self.ports.s3}",
            access_key="pollinate-admin",
            secret_key=secrets.token_urlsafe(24),
            bucket=S3_BUCKET,
        )
        self.s3_file.write_text(json.dumps(asdict(settings)))
        self.s3_file.chmod(0o600)
        self._spawn("minio", [
            str(self.bin_dir / "minio"), "server", str(self.state_dir / "s3"),
            # In execute mode pods reach it on the bridge address too.
            "--address", f"{'' if self.executing else '127.0.0.1'}:{self.ports.s3}",
            "--console-address", f"127.0.0.1:{self.ports.s3_console}", "--quiet",
        ], env={
            "MINIO_ROOT_USER": settings.access_key,
            "MINIO_ROOT_PASSWORD": settings.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        })

    def _create_bucket(self) -> None:
        s3 = self.s3_client()
        s3.create_bucket(Bucket=S3_BUCKET)
        s3.put_bucket_versioning(
            Bucket=S3_BUCKET, VersioningConfiguration={"Status": "Enabled"}
        )

    def _create_nodes(self) -> None:
        docs = "\n---\n".join(yaml.safe_dump(n) for n in cluster_nodes())
        self.kubectl("apply", "-f", "-", input=docs)

    def _start_node_agent(self) -> None:
        """The agent registers the nodes itself; the s3 Service leads pods to MinIO."""
        self._spawn("node-agent", execute_mode.agent_command(self.kubeconfig, self.agent_dir, self.network),
                    env={"PATH": execute_mode.agent_path(self.bin_dir)})
        docs = execute_mode.s3_service_manifests(self.network, self.ports.s3)
        self.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))

    def _start_ingress_controller(self) -> None:
        """Traefik, authenticated as its own ServiceAccount (ingress_controller.py)."""
        docs = ingress_controller.manifests()
        self.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs))
        token = self.kubectl("create", "token", ingress_controller.SERVICE_ACCOUNT,
                             "-n", ingress_controller.NAMESPACE,
                             f"--duration={ingress_controller.TOKEN_LIFETIME}").strip()
        token_file = self.pki_dir / "ingress-controller.token"
        token_file.write_text(token)
        token_file.chmod(0o600)
        self._spawn("ingress-controller", ingress_controller.command(
            self.bin_dir / "traefik", self.server, self.pki_dir / "pollinate-testbed-ca.crt", token_file,
            self.network, self.ports.ingress_ping))

    @property
    def ingress_address(self) -> str:
        """Where Ingresses of class `nginx` are served (HTTPS, port 443) in execute mode."""
        return self.network.gateway

    # ---- helpers ---------------------------------------------------------------------
    def s3_client(self):
        import boto3  # only needed once S3 is up; keeps `down` free of it

        s = self.s3()
        return boto3.client(
            "s3", endpoint_url=s.endpoint, aws_access_key_id=s.access_key,
            aws_secret_access_key=s.secret_key, region_name=s.region,
        )

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, check=False,
        )
        if check and result.returncode != 0:
            raise TestbedError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "pollinate-testbed-ca.crt"))
        ctx.load_cert_chain(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
        return ctx

    def _apiserver_ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"{self.server}/readyz", context=self._ssl_context(), timeout=2
            ) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError, ssl.SSLError):
            return False

    def _s3_ready(self) -> bool:
        try:
            url = f"{self.s3().endpoint}/minio/health/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _default_service_account_exists(self) -> bool:
        return bool(self.kubectl("get", "serviceaccount", "default", "-o", "name", check=False))

    def _nodes_ready(self) -> bool:
        out = self.kubectl(
            "get", "nodes", "-o",
            "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}",
            check=False,
        ).split()
        return len(out) == len(cluster_nodes()) and all(s == "True" for s in out)

    def _ingress_controller_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports.ingress_ping}/ping", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _wait(self, ready, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise TestbedError(f"{what} not ready after {timeout:.0f} s; logs in {self.log_dir}")


def kubeconfig(server: str, ca_cert: Path, client: pki.CertPair, name: str) -> dict:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {
            "server": server, "certificate-authority-data": b64(ca_cert)}}],
        "users": [{"name": name, "user": {
            "client-certificate-data": b64(client.cert), "client-key-data": b64(client.key)}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }


def _stop_all(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM every process group at once, then SIGKILL what is left after `grace`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _group_alive(pid)]
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    # A child of ours that exited stays a zombie until reaped; it does not count as alive.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True
