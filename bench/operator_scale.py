"""Operator scale: the real operator on the local control plane with kwok-simulated GPU nodes,
against the API server's own rate for creating the same child objects directly.

    python bench/operator_scale.py            # 1,000 nodes / 100 sites, 100 Federations, 200 TrainingRounds
    python bench/operator_scale.py --quick    # 100 nodes / 10 sites, 5 Federations, 10 TrainingRounds
    python bench/operator_scale.py --tiny     # 4 nodes / 2 sites, 1 Federation, 2 TrainingRounds

It starts its own testbed (simulate mode, ports shifted by 4000, state in a temporary folder),
adds the GPU nodes, and then, in one run:

1. direct: server-side apply (the operator's own client, 10 threads) of every child the operator would
   create for these Federations and TrainingRounds (built by the operator's own manifest
   functions), in a namespace of its own; until every pod is scheduled.
2. the operator (`python -m pollinate_operator`, a process): create the Federations, until each
   is Ready; create the TrainingRounds, until every client Job exists and every pod is scheduled;
   a steady window; then delete some Jobs and server Deployments, until they are back.

Latencies are taken by watches in this process, from the create (or delete) request to the
first sight of the child. The operator's peak RSS is its VmHWM, its CPU from /proc.
Targets (issue 6): reconcile p99 under 2 s, operator RSS under 300 MB.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from common import REPO, Headline, load_average, parse_mode, print_notes, print_table, write_result

NAME = "operator_scale"
RECONCILE_P99_TARGET = 2.0  # seconds
RSS_TARGET = 300e6  # bytes
# The chart's defaults (charts/pollinate/values.yaml resyncSeconds, settledResyncSeconds).
RESYNC_SECONDS = 10.0
SETTLED_RESYNC_SECONDS = 60.0
PORT_OFFSET = 4000
GROUP, VERSION = "pollinate.dev", "v1alpha1"
SITE_LABEL = "pollinate.dev/site"
GPU_RESOURCE = "nvidia.com/gpu"
DIRECT_NS, OPERATOR_NS = "scale-direct", "scale-operator"
# Threads applying directly: the operator's client keeps 10 connections (urllib3's pool size,
# kubernetes' default), so more threads would only queue for a connection.
CLIENT_WORKERS = 10


@dataclass(frozen=True)
class Plan:
    sites: int
    nodes_per_site: int
    gpus_per_node: int
    federations: int
    sites_per_federation: int
    rounds_per_federation: int
    deleted_jobs: int  # children deleted to time their recreation
    deleted_deployments: int
    steady_seconds: float  # a window with nothing to do but the timers
    # Then, on the loaded cluster, this many objects one at a time: a Federation, its
    # TrainingRound, one of its Jobs and its Deployment deleted (each waited for).
    probes: int
    timeout: float  # per phase

    @property
    def nodes(self) -> int:
        return self.sites * self.nodes_per_site

    @property
    def training_rounds(self) -> int:
        return self.federations * self.rounds_per_federation

    @property
    def jobs(self) -> int:
        return self.training_rounds * self.sites_per_federation


PLANS = {
    "tiny": Plan(sites=2, nodes_per_site=2, gpus_per_node=8, federations=1, sites_per_federation=2,
                 rounds_per_federation=2, deleted_jobs=2, deleted_deployments=1, steady_seconds=10,
                 probes=1, timeout=180),
    "quick": Plan(sites=10, nodes_per_site=10, gpus_per_node=8, federations=5, sites_per_federation=10,
                  rounds_per_federation=2, deleted_jobs=10, deleted_deployments=5, steady_seconds=30,
                  probes=3, timeout=300),
    "full": Plan(sites=100, nodes_per_site=10, gpus_per_node=8, federations=100, sites_per_federation=10,
                 rounds_per_federation=2, deleted_jobs=100, deleted_deployments=20, steady_seconds=30,
                 probes=10, timeout=900),
}


# ---- pure helpers: what is created --------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Iterable[float]) -> dict[str, float | int]:
    values = list(values)
    if not values:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan}
    return {"n": len(values), "p50": round(percentile(values, 50), 3),
            "p99": round(percentile(values, 99), 3), "max": round(max(values), 3)}


def site_name(index: int) -> str:
    return f"site-{index:03d}"


def federation_name(index: int) -> str:
    return f"fed-{index:03d}"


def round_name(federation: str, index: int) -> str:
    return f"{federation}-r{index}"


def federation_sites(plan: Plan, index: int) -> list[str]:
    """Consecutive sites, wrapping: every site serves the same number of Federations."""
    if plan.sites_per_federation > plan.sites:
        raise ValueError(f"sites_per_federation {plan.sites_per_federation} > sites {plan.sites}")
    first = index * plan.sites_per_federation
    return [site_name((first + j) % plan.sites) for j in range(plan.sites_per_federation)]


def gpu_nodes(plan: Plan) -> list[dict]:
    """kwok nodes labelled as the testbed labels its own (pollinate.dev/site, nvidia.com/gpu)."""
    from pollinate_testbed.nodes import GPU_PRODUCT_LABEL, gpu_node_name, node_manifest

    capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti",
                GPU_RESOURCE: str(plan.gpus_per_node)}
    return [node_manifest(gpu_node_name(site_name(s), i),
                          {SITE_LABEL: site_name(s), GPU_PRODUCT_LABEL: "NVIDIA-H100-80GB-HBM3"}, capacity)
            for s in range(plan.sites) for i in range(plan.nodes_per_site)]


def federation_manifest(name: str, namespace: str, sites: list[str], s3_endpoint: str) -> dict:
    """The example Federation with these sites, node authentication off: no Flower server runs
    on a simulated node, and with it on no site key could ever be registered (never Ready)."""
    body = yaml.safe_load((REPO / "examples" / "federation.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    spec = body["spec"]
    spec["storage"]["s3"].update(endpoint=s3_endpoint, prefix=name)
    spec["server"]["nodeAuthentication"] = False
    spec.pop("generalEvaluation", None)
    spec["sites"] = [{"name": s, "nodeSelector": {SITE_LABEL: s},
                      "resources": {"limits": {GPU_RESOURCE: 1}},
                      "data": {"configMap": {"name": f"{s}-notes"}}} for s in sites]
    return body


def training_round_manifest(name: str, namespace: str, federation: str, sites: list[str]) -> dict:
    body = yaml.safe_load((REPO / "examples" / "traininground.yaml").read_text())
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"].update(federation=federation, sites=sites, minSites=min(2, len(sites)))
    return body


def custom_resources(plan: Plan, namespace: str, s3_endpoint: str) -> tuple[list[dict], list[dict]]:
    federations, rounds = [], []
    for f in range(plan.federations):
        name, sites = federation_name(f), federation_sites(plan, f)
        federations.append(federation_manifest(name, namespace, sites, s3_endpoint))
        rounds += [training_round_manifest(round_name(name, r), namespace, name, sites)
                   for r in range(plan.rounds_per_federation)]
    return federations, rounds


def direct_children(federations: list[dict], rounds: list[dict], namespace: str) -> list[dict]:
    """Every child the operator creates for these resources, by its own manifest functions,
    in `namespace` and without owner references. One CA, certificate and site key serve all
    (the bytes are the same size as per-federation ones; generating 1,100 keys is not the
    point)."""
    from pollinate_operator import pki
    from pollinate_operator.api.federation import FederationSpec
    from pollinate_operator.api.traininground import TrainingRoundSpec
    from pollinate_operator.manifests import clients, secrets, server
    from pollinate_operator.settings import Settings

    settings = Settings()
    ca = pki.new_ca("pollinate bench CA")
    site_key = pki.new_site_key()
    specs = {b["metadata"]["name"]: FederationSpec.model_validate(b["spec"]) for b in federations}
    first = next(iter(specs), "")
    cert = (pki.new_server_certificate(ca, server.tls_dns_names(first, namespace, specs[first]))
            if specs else None)
    objects: list[dict] = []
    for name, spec in specs.items():
        assert cert is not None
        objects.append(secrets.ca_secret(name, namespace, ca, spec.server.tls.rotation))
        objects.append(secrets.server_tls_secret(name, namespace, ca.cert_pem, cert,
                                                 spec.server.tls.rotation))
        objects += [secrets.site_secret(name, namespace, s.name, site_key, ca.cert_pem) for s in spec.sites]
        objects += server.server_objects(name, namespace, spec, settings, pki.fingerprint(cert.cert_pem))
    for body in rounds:
        tr = TrainingRoundSpec.model_validate(body["spec"])
        fed = specs[tr.federation]
        address = server.in_cluster_address(tr.federation, namespace, settings)
        objects += [clients.client_job(body["metadata"]["name"], namespace, tr, tr.federation, fed,
                                       fed.site(s), address) for s in tr.sites]
    return objects


def latencies(started: dict[str, float], seen: dict[str, float]) -> dict[str, float]:
    """name -> seconds from start to sight, for every started name that was seen."""
    return {n: max(0.0, seen[n] - t) for n, t in started.items() if n in seen}


# ---- watching -----------------------------------------------------------------------------


@dataclass
class Sightings:
    """What one watch saw, by local monotonic time: first sight of each object (name, uid),
    deletions, and when a predicate (scheduled, Ready) first held."""

    first: dict[tuple[str, str], float] = field(default_factory=dict)
    uid: dict[str, str] = field(default_factory=dict)
    deleted: dict[str, float] = field(default_factory=dict)
    marked: dict[str, float] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def first_by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (name, _), t in self.first.items():
            out[name] = min(t, out.get(name, math.inf))
        return out

    def recreated(self, name: str, old_uid: str) -> float | None:
        times = [t for (n, u), t in self.first.items() if n == name and u != old_uid]
        return min(times) if times else None


class Watch:
    """A raw watch stream (no model deserialisation: thousands of pods), resumed on timeout
    and re-listed on 410 Gone."""

    def __init__(self, open_stream: Callable[..., Any], mark: Callable[[dict], bool] | None = None) -> None:
        self.open_stream = open_stream
        self.mark = mark
        self.seen = Sightings()
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        rv = None
        while not self._stop.is_set():
            try:
                resp = self.open_stream(watch=True, resource_version=rv, timeout_seconds=60,
                                        allow_watch_bookmarks=True, _preload_content=False)
                self.synced.set()
                for line in iter_resp_lines(resp):
                    now = time.monotonic()
                    event = json.loads(line)
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        rv = None if obj.get("code") == 410 else rv
                        break
                    rv = obj["metadata"].get("resourceVersion", rv)
                    if event["type"] != "BOOKMARK":
                        self._record(event["type"], obj, now)
                    if self._stop.is_set():
                        break
                resp.release_conn()
            except Exception as err:  # a dropped stream is resumed; the bench must not die of it
                if not self._stop.is_set():
                    print(f"watch restarted: {type(err).__name__}: {err}"[:200], flush=True)
                    time.sleep(1)

    def _record(self, kind: str, obj: dict, now: float) -> None:
        meta = obj["metadata"]
        name, uid = meta["name"], meta["uid"]
        with self.lock:
            s = self.seen
            if kind == "DELETED":
                s.deleted[name] = now
                return
            s.first.setdefault((name, uid), now)
            s.uid[name] = uid
            s.labels[name] = meta.get("labels") or {}
            if self.mark and name not in s.marked and self.mark(obj):
                s.marked[name] = now

    def snapshot(self) -> Sightings:
        with self.lock:
            s = self.seen
            return Sightings(dict(s.first), dict(s.uid), dict(s.deleted), dict(s.marked),
                             dict(s.labels))

    def stop(self) -> None:
        self._stop.set()


def _scheduled(pod: dict) -> bool:
    return bool(pod.get("spec", {}).get("nodeName"))


def _ready(resource: dict) -> bool:
    return (resource.get("status") or {}).get("phase") == "Ready"


class NamespaceWatches:
    """Jobs, Deployments, pods (scheduled) and, for the operator, Federations (Ready)."""

    def __init__(self, namespace: str, custom: bool) -> None:
        from pollinate_operator.clients import kube

        core, batch, apps = kube.core(), kube.batch(), kube.apps()
        self.jobs = Watch(lambda **kw: batch.list_namespaced_job(namespace, **kw))
        self.deployments = Watch(lambda **kw: apps.list_namespaced_deployment(namespace, **kw))
        self.pods = Watch(lambda **kw: core.list_namespaced_pod(namespace, **kw), mark=_scheduled)
        self.all = [self.jobs, self.deployments, self.pods]
        if custom:
            api = kube.custom()
            self.federations = Watch(lambda **kw: api.list_namespaced_custom_object(
                GROUP, VERSION, namespace, "federations", **kw), mark=_ready)
            self.all.append(self.federations)
        for w in self.all:
            w.synced.wait(30)

    def stop(self) -> None:
        for w in self.all:
            w.stop()


def scheduled_owners(pods: Sightings) -> dict[str, float]:
    """Job name (or Deployment instance) -> when its first pod was scheduled."""
    out: dict[str, float] = {}
    for pod, t in pods.marked.items():
        labels = pods.labels.get(pod, {})
        owner = labels.get("job-name") or labels.get("app.kubernetes.io/instance") or pod
        out[owner] = min(t, out.get(owner, math.inf))
    return out


def wait_until(done: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(interval)
    return done()


# ---- processes ----------------------------------------------------------------------------


@dataclass
class Usage:
    """CPU seconds (user + system) of the operator, kube-apiserver and etcd at phase marks,
    and the operator's RSS sampled twice a second."""

    processes: dict[str, psutil.Process]
    marks: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def cpu(self) -> dict[str, float]:
        out = {}
        for name, proc in self.processes.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[name] = t.user + t.system
        return out

    def mark(self, phase: str) -> None:
        self.marks[phase] = {**self.cpu(), "wall": time.monotonic()}

    def sample_operator_rss(self) -> None:
        def loop() -> None:
            while not self._stop.wait(0.5):
                with contextlib.suppress(psutil.Error):
                    self.rss_samples.append((time.monotonic(), self.processes["operator"].memory_info().rss))
        threading.Thread(target=loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def between(self, start: str, end: str) -> dict[str, float]:
        a, b = self.marks[start], self.marks[end]
        return {k: round(b[k] - a[k], 2) for k in b if k in a}


def peak_rss(pid: int) -> int:
    """VmHWM: the most the process ever had resident, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorUnderTest:
    """`python -m pollinate_operator` against the testbed, with its liveness and metrics ports."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.liveness, self.metrics = _free_port(), _free_port()
        self.log_path = log_path
        env = {**os.environ, **env, "POLLINATE_RESYNC_SECONDS": str(RESYNC_SECONDS),
               "POLLINATE_SETTLED_RESYNC_SECONDS": str(SETTLED_RESYNC_SECONDS),
               "POLLINATE_METRICS_PORT": str(self.metrics)}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pollinate_operator",
                 "--liveness", f"http://127.0.0.1:{self.liveness}/healthz"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the operator exited ({self.proc.returncode}): {self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as r:
            return r.read().decode()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def reconcile_metrics(text: str) -> dict[str, dict[str, float]]:
    """pollinate_reconcile_seconds count and sum, and errors, per kind, from /metrics."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        for metric, key in (("pollinate_reconcile_seconds_count", "passes"),
                            ("pollinate_reconcile_seconds_sum", "seconds"),
                            ("pollinate_reconcile_errors_total", "errors")):
            if line.startswith(metric + "{"):
                kind = line.split('kind="', 1)[1].split('"', 1)[0]
                out.setdefault(kind, {})[key] = float(line.rsplit(" ", 1)[1])
    for values in out.values():
        if values.get("passes"):
            values["mean_pass_seconds"] = round(values.get("seconds", 0) / values["passes"], 4)
    return out


def log_summary(text: str) -> dict[str, int]:
    lines = text.splitlines()
    return {"lines": len(lines),
            "errors": sum(1 for line in lines if any(m in line for m in (" ERROR ", "[ERROR", "Traceback"))),
            "flower_unreachable": sum(1 for line in lines if "Flower server not reachable" in line),
            "s3_progress_unreadable": sum(1 for line in lines if "not readable yet" in line)}


# ---- the run ------------------------------------------------------------------------------


class Cluster:
    """Our own testbed (simulate mode), its GPU nodes, namespaces and clients."""

    def __init__(self, plan: Plan, work: Path) -> None:
        from pollinate_testbed.cluster import Ports, Testbed

        ports = Ports(**{k: v + PORT_OFFSET for k, v in asdict(Ports()).items()})
        self.bed = Testbed(state_dir=work / "testbed", ports=ports)
        self.plan = plan

    def up(self) -> None:
        self.bed.up(log=lambda m: print(m, flush=True), execute=False)
        os.environ["KUBECONFIG"] = str(self.bed.kubeconfig)  # for the operator's own client module
        self.bed.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        for crd in ("federations", "trainingrounds"):
            self.bed.kubectl("wait", "--for=condition=Established", f"crd/{crd}.{GROUP}", "--timeout=60s")
        t0 = time.monotonic()
        nodes = gpu_nodes(self.plan)
        apply_nodes(nodes)
        if not wait_until(lambda: self.ready_gpu_nodes() >= len(nodes), 600, 2):
            raise RuntimeError(f"only {self.ready_gpu_nodes()} of {len(nodes)} GPU nodes Ready")
        print(f"{len(nodes)} GPU nodes Ready in {time.monotonic() - t0:.1f} s", flush=True)
        s3 = self.bed.s3()
        for ns in (DIRECT_NS, OPERATOR_NS):
            self.bed.kubectl("create", "namespace", ns)
            self.bed.kubectl("-n", ns, "create", "secret", "generic", "s3-credentials",
                             f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
                             f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}")

    def ready_gpu_nodes(self) -> int:
        from pollinate_operator.clients import kube

        nodes = kube.core().list_node(label_selector=SITE_LABEL, _preload_content=False)
        items = json.loads(nodes.data)["items"]
        return sum(1 for n in items if n["metadata"]["labels"][SITE_LABEL].startswith("site-")
                   and any(c["type"] == "Ready" and c["status"] == "True"
                           for c in n.get("status", {}).get("conditions", [])))

    def process(self, component: str) -> psutil.Process:
        return psutil.Process(int(next(self.bed.pid_dir.glob(f"*-{component}.pid")).read_text()))

    def down(self) -> None:
        self.bed.down(quiet=True)


def apply_nodes(nodes: list[dict], workers: int = CLIENT_WORKERS) -> None:
    """Server-side apply of the simulated nodes (cluster-scoped: not a kind the operator writes,
    so through the operator client's raw request, not kube.apply)."""
    from pollinate_operator.clients import kube

    def apply(node: dict) -> None:
        kube.request("PATCH", f"/api/v1/nodes/{node['metadata']['name']}",
                     query=[("fieldManager", "operator-scale-bench"), ("force", "true")],
                     body=node, content_type="application/apply-patch+yaml")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(apply, nodes))


def apply_all(objects: list[dict], workers: int = CLIENT_WORKERS) -> tuple[float, list[float]]:
    """Server-side apply of `objects` by the operator's own client function (kube.apply: the
    same request the operator sends), `workers` at a time; returns the wall seconds and each
    request's seconds."""
    from pollinate_operator.clients import kube

    requests: list[float] = []

    def apply(body: dict) -> None:
        t = time.monotonic()
        kube.apply(body)
        requests.append(time.monotonic() - t)

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(apply, objects))
    return time.monotonic() - t0, requests


def measure_direct(cluster: Cluster, children: list[dict], usage: Usage, plan: Plan) -> dict[str, Any]:
    watches = NamespaceWatches(DIRECT_NS, custom=False)
    jobs = [o["metadata"]["name"] for o in children if o["kind"] == "Job"]
    deployments = [o["metadata"]["name"] for o in children if o["kind"] == "Deployment"]
    usage.mark("direct_start")
    t0 = time.monotonic()
    seconds, requests = apply_all(children)
    owners = [*jobs, *(d.removesuffix("-server") for d in deployments)]
    all_scheduled = wait_until(lambda: len(scheduled_owners(watches.pods.snapshot())) >= len(owners),
                               plan.timeout)
    usage.mark("direct_end")
    pods = scheduled_owners(watches.pods.snapshot())
    watches.stop()
    kinds: dict[str, int] = {}
    for o in children:
        kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
    return {
        "objects": len(children), "objects_by_kind": kinds, "client_workers": CLIENT_WORKERS,
        "apply_seconds": round(seconds, 2), "objects_per_second": round(len(children) / seconds, 1),
        "request_seconds": distribution(requests),
        "all_pods_scheduled": all_scheduled,
        "pods_scheduled_seconds": round(max(pods.values()) - t0, 2) if pods else None,
        "pods_scheduled": len(pods), "pods_expected": len(owners),
        "cpu_seconds": usage.between("direct_start", "direct_end"),
    }


def create_all(bodies: list[dict], plural: str, workers: int = 8) -> dict[str, float]:
    """Create the custom resources `workers` at a time; name -> when its request was sent."""
    from pollinate_operator.clients import kube

    api = kube.custom()
    sent: dict[str, float] = {}

    def create(body: dict) -> None:
        sent[body["metadata"]["name"]] = time.monotonic()
        api.create_namespaced_custom_object(GROUP, VERSION, OPERATOR_NS, plural, body,
                                            _preload_content=False)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, bodies))
    return sent


def delete_children(kind: str, names: list[str], uids: dict[str, str]) -> dict[str, tuple[str, float]]:
    from pollinate_operator.clients import kube

    delete = {"Job": kube.batch().delete_namespaced_job,
              "Deployment": kube.apps().delete_namespaced_deployment}[kind]
    deleted = {}
    for name in names:
        deleted[name] = (uids[name], time.monotonic())
        delete(name, OPERATOR_NS, propagation_policy="Background", _preload_content=False)
    return deleted


def recreation(seen: Sightings, deleted: dict[str, tuple[str, float]]) -> dict[str, float]:
    out = {}
    for name, (old_uid, t) in deleted.items():
        back = seen.recreated(name, old_uid)
        if back is not None:
            out[name] = max(0.0, back - t)
    return out


def measure_one_at_a_time(plan: Plan, watches: NamespaceWatches, s3_endpoint: str) -> dict[str, Any]:
    """Reconcile latency of one object at a time on the loaded cluster (every other object still
    reconciled by its timer), instead of one of hundreds sent at once: the operator's reaction
    time, without the queue a burst builds in front of it."""
    from pollinate_operator.manifests import names

    fed_to_dep, round_to_jobs, job_back, dep_back = [], [], [], []
    for i in range(plan.probes):
        fed, sites = f"probe-{i:02d}", federation_sites(plan, i)
        sent = create_all([federation_manifest(fed, OPERATOR_NS, sites, s3_endpoint)], "federations")
        if not wait_until(lambda f=fed: f in watches.federations.snapshot().marked, 120):
            raise RuntimeError(f"probe Federation {fed} not Ready in 120 s")
        fed_to_dep.append(watches.deployments.snapshot().first_by_name()[names.server(fed)] - sent[fed])
        tr = round_name(fed, 0)
        jobs = [names.client_job(tr, s) for s in sites]
        sent = create_all([training_round_manifest(tr, OPERATOR_NS, fed, sites)], "trainingrounds")
        if not wait_until(lambda js=jobs: all(j in watches.jobs.snapshot().uid for j in js), 120,
                          interval=0.1):
            raise RuntimeError(f"probe TrainingRound {tr}: not every Job in 120 s")
        seen = watches.jobs.snapshot().first_by_name()
        round_to_jobs.append(max(seen[j] for j in jobs) - sent[tr])
        for kind, name, watch, out in (("Job", jobs[0], watches.jobs, job_back),
                                       ("Deployment", names.server(fed), watches.deployments, dep_back)):
            deleted = delete_children(kind, [name], watch.snapshot().uid)
            if not wait_until(lambda w=watch, d=deleted: bool(recreation(w.snapshot(), d)), 120,
                              interval=0.1):
                raise RuntimeError(f"probe {kind} {name} not recreated in 120 s")
            out.extend(recreation(watch.snapshot(), deleted).values())
    return {"federation_create_to_deployment": distribution(fed_to_dep),
            "training_round_create_to_every_job": distribution(round_to_jobs),
            "recreate": distribution([*job_back, *dep_back]),
            "recreate_jobs": distribution(job_back), "recreate_deployments": distribution(dep_back)}


def measure_operator(cluster: Cluster, federations: list[dict], rounds: list[dict], usage: Usage,
                     plan: Plan, work: Path) -> dict[str, Any]:
    from pollinate_operator.manifests import names

    watches = NamespaceWatches(OPERATOR_NS, custom=True)
    operator = OperatorUnderTest(cluster.bed.env(), work / "operator.log")
    usage.processes["operator"] = psutil.Process(operator.proc.pid)
    usage.sample_operator_rss()
    usage.mark("operator_start")
    result: dict[str, Any] = {"resync_seconds": RESYNC_SECONDS,
                              "settled_resync_seconds": SETTLED_RESYNC_SECONDS,
                              "log": str(work / "operator.log")}
    try:
        if not wait_until(operator.alive, 300):
            raise RuntimeError(f"the operator never answered its liveness probe: {operator.tail()}")
        time.sleep(2)  # its watch streams open just after the probe answers
        usage.mark("operator_ready")
        result["startup_seconds"] = round(usage.marks["operator_ready"]["wall"]
                                          - usage.marks["operator_start"]["wall"], 1)
        fed_names = [f["metadata"]["name"] for f in federations]
        job_names = {r["metadata"]["name"]: [names.client_job(r["metadata"]["name"], s)
                                             for s in r["spec"]["sites"]] for r in rounds}
        all_jobs = [j for names in job_names.values() for j in names]

        # Federations: create -> server Deployment; create -> Ready.
        t_feds = time.monotonic()
        sent = create_all(federations, "federations")
        ready = wait_until(lambda: len(watches.federations.snapshot().marked) >= len(fed_names), plan.timeout)
        usage.mark("federations_ready")
        deps = {n.removesuffix("-server"): t
                for n, t in watches.deployments.snapshot().first_by_name().items()}
        result["federations"] = {
            "all_ready": ready, "ready_seconds": round(time.monotonic() - t_feds, 2),
            "create_to_server_deployment": distribution(latencies(sent, deps).values()),
            "create_to_ready": distribution(latencies(sent, watches.federations.snapshot().marked).values()),
            "cpu_seconds": usage.between("operator_ready", "federations_ready"),
        }
        print(f"federations: {result['federations']}", flush=True)

        # TrainingRounds: create -> every client Job; until every pod is scheduled.
        t_rounds = time.monotonic()
        sent = create_all(rounds, "trainingrounds")
        all_exist = wait_until(lambda: all(j in watches.jobs.snapshot().uid for j in all_jobs), plan.timeout)
        t_jobs = time.monotonic()
        owners = [*all_jobs, *fed_names]
        all_scheduled = wait_until(lambda: len(set(owners) & set(scheduled_owners(watches.pods.snapshot())))
                                   >= len(owners), plan.timeout)
        usage.mark("rounds_done")
        seen_jobs = watches.jobs.snapshot().first_by_name()
        every_job = {r: max(seen_jobs[j] for j in js) for r, js in job_names.items()
                     if all(j in seen_jobs for j in js)}
        first_job = {r: min(seen_jobs[j] for j in js if j in seen_jobs) for r, js in job_names.items()
                     if any(j in seen_jobs for j in js)}
        pods = scheduled_owners(watches.pods.snapshot())
        result["training_rounds"] = {
            "all_jobs_exist": all_exist, "all_pods_scheduled": all_scheduled,
            "jobs_seconds": round(max(every_job.values()) - t_rounds, 2) if every_job else None,
            "jobs_wait_seconds": round(t_jobs - t_rounds, 2),
            "pods_scheduled_seconds": round(max(pods[o] for o in owners if o in pods) - t_rounds, 2)
            if pods else None,
            "since_first_federation_seconds": round(max(pods.values()) - t_feds, 2) if pods else None,
            "jobs_seen": sum(1 for j in all_jobs if j in seen_jobs), "jobs_expected": len(all_jobs),
            "create_to_first_job": distribution(latencies(sent, first_job).values()),
            "create_to_every_job": distribution(latencies(sent, every_job).values()),
            "cpu_seconds": usage.between("federations_ready", "rounds_done"),
        }
        print(f"training rounds: {result['training_rounds']}", flush=True)

        # Steady state: nothing changes, the timers still reconcile every object.
        time.sleep(plan.steady_seconds)
        usage.mark("steady_done")
        steady = usage.between("rounds_done", "steady_done")
        result["steady"] = {"seconds": plan.steady_seconds, "cpu_seconds": steady,
                            "operator_cpu_fraction":
                                round(steady.get("operator", 0) / plan.steady_seconds, 3)}
        print(f"steady: {result['steady']}", flush=True)

        # Children deleted -> recreated (a watch on each kind wakes the owner:
        # handlers/level_triggered.wake_owners_of).
        job_uids, dep_uids = watches.jobs.snapshot().uid, watches.deployments.snapshot().uid
        step = max(1, len(all_jobs) // plan.deleted_jobs)
        victims = [j for j in all_jobs[::step] if j in job_uids][:plan.deleted_jobs]
        dep_victims = [names.server(f) for f in fed_names
                       if names.server(f) in dep_uids][:plan.deleted_deployments]
        deleted_jobs = delete_children("Job", victims, job_uids)
        deleted_deps = delete_children("Deployment", dep_victims, dep_uids)
        def all_back() -> bool:
            return (len(recreation(watches.jobs.snapshot(), deleted_jobs)) >= len(victims)
                    and len(recreation(watches.deployments.snapshot(), deleted_deps)) >= len(dep_victims))

        back = wait_until(all_back, plan.timeout)
        usage.mark("recreated")
        job_back = recreation(watches.jobs.snapshot(), deleted_jobs)
        dep_back = recreation(watches.deployments.snapshot(), deleted_deps)
        result["recreate"] = {
            "all_back": back,
            "jobs": distribution(job_back.values()), "deployments": distribution(dep_back.values()),
            "all": distribution([*job_back.values(), *dep_back.values()]),
            "cpu_seconds": usage.between("steady_done", "recreated"),
        }
        print(f"recreate: {result['recreate']}", flush=True)

        s3_endpoint = federations[0]["spec"]["storage"]["s3"]["endpoint"]
        result["one_at_a_time"] = measure_one_at_a_time(plan, watches, s3_endpoint)
        usage.mark("probes_done")
        result["one_at_a_time"]["cpu_seconds"] = usage.between("recreated", "probes_done")
        print(f"one at a time: {result['one_at_a_time']}", flush=True)
    except Exception as err:  # keep what was measured up to here, and say where it stopped
        result["error"] = f"{type(err).__name__}: {err}"[:1000]
        print(f"operator phase stopped: {result['error']}", flush=True)
    finally:
        if operator.proc.poll() is None:
            usage.mark("end")
            with contextlib.suppress(OSError):
                result["reconcile_metrics"] = reconcile_metrics(operator.metrics_text())
            result["peak_rss_bytes"] = peak_rss(operator.proc.pid)
            result["rss_sampled_max_bytes"] = max((r for _, r in usage.rss_samples), default=0)
            result["cpu_seconds_total"] = usage.between("operator_start", "end")
            result["apiserver_peak_rss_bytes"] = peak_rss(usage.processes["apiserver"].pid)
        usage.stop()
        operator.stop()
        watches.stop()
        result["log_summary"] = log_summary(operator.log_path.read_text(errors="replace"))
    return result


# ---- report -------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f} s"


def headlines(plan: Plan, direct: dict[str, Any], op: dict[str, Any]) -> list[Headline]:
    out = []
    tr, fed, rec = op.get("training_rounds", {}), op.get("federations", {}), op.get("recreate", {})
    scale = (f"{plan.federations} Federations + {plan.training_rounds} TrainingRounds "
             f"({plan.jobs:,} Jobs) on {plan.nodes:,} nodes / {plan.sites} sites")
    against = (f"direct apply of the same {direct['objects']:,} objects: {direct['apply_seconds']:.1f} s "
               f"({direct['objects_per_second']:.0f}/s, one request p50 "
               f"{direct['request_seconds']['p50'] * 1000:.0f} ms), pods scheduled "
               f"{_s(direct['pods_scheduled_seconds'])}")
    if tr.get("pods_scheduled_seconds") and direct.get("pods_scheduled_seconds"):
        ratio = f"{tr['since_first_federation_seconds'] / direct['pods_scheduled_seconds']:.1f}x"
    else:
        ratio = "-"
    out.append(Headline(NAME, f"{scale}: every Job exists and every pod is scheduled",
                        f"{_s(tr.get('since_first_federation_seconds'))} from the first Federation "
                        f"(TrainingRounds: Jobs {_s(tr.get('jobs_seconds'))}, pods "
                        f"{_s(tr.get('pods_scheduled_seconds'))})"
                        + ("" if tr.get("all_pods_scheduled") else
                           f"; NOT all: {tr.get('jobs_seen')}/{tr.get('jobs_expected')} Jobs"),
                        against, ratio, "-", None))
    one = op.get("one_at_a_time", {})
    burst = (f"all {plan.federations} sent at once", f"all {plan.training_rounds} sent at once",
             f"{plan.deleted_jobs + plan.deleted_deployments} deleted at once")
    for case, dist in (
            (f"reconcile, {burst[0]}: Federation created -> server Deployment",
             fed.get("create_to_server_deployment")),
            (f"reconcile, {burst[1]}: TrainingRound created -> all its {plan.sites_per_federation} Jobs",
             tr.get("create_to_every_job")),
            (f"reconcile, {burst[2]}: child deleted -> recreated (Jobs, server Deployments)",
             rec.get("all")),
            ("reconcile, one at a time at this scale: Federation created -> server Deployment",
             one.get("federation_create_to_deployment")),
            (f"reconcile, one at a time at this scale: TrainingRound created -> all its "
             f"{plan.sites_per_federation} Jobs", one.get("training_round_create_to_every_job")),
            ("reconcile, one at a time at this scale: child deleted -> recreated (a Job, a Deployment)",
             one.get("recreate"))):
        if not dist or not dist["n"]:
            out.append(Headline(NAME, case, "not measured", "-", "-",
                                f"p99 < {RECONCILE_P99_TARGET:g} s", False))
            continue
        out.append(Headline(NAME, case, f"p50 {dist['p50']:.2f} s, p99 {dist['p99']:.2f} s (n={dist['n']})",
                            f"one direct apply: p50 {direct['request_seconds']['p50'] * 1000:.0f} ms, p99 "
                            f"{direct['request_seconds']['p99'] * 1000:.0f} ms; resync {RESYNC_SECONDS:g} s "
                            f"(settled {SETTLED_RESYNC_SECONDS:g} s)",
                            f"p99 = {dist['p99'] / RECONCILE_P99_TARGET:.2f}x target",
                            f"p99 < {RECONCILE_P99_TARGET:g} s", dist["p99"] < RECONCILE_P99_TARGET))
    if "peak_rss_bytes" in op:
        rss = op["peak_rss_bytes"]
        out.append(Headline(NAME, "operator peak RSS (VmHWM)", f"{rss / 1e6:.0f} MB",
                            f"kube-apiserver {op['apiserver_peak_rss_bytes'] / 1e6:.0f} MB",
                            f"{rss / op['apiserver_peak_rss_bytes']:.2f}x", f"< {RSS_TARGET / 1e6:.0f} MB",
                            rss < RSS_TARGET))
        cpu = op["cpu_seconds_total"]
        steady = op.get("steady", {}).get("operator_cpu_fraction")
        out.append(Headline(NAME, "operator CPU seconds, start to last recreate",
                            f"{cpu['operator']:.0f} CPU s"
                            + (f" ({steady:.0%} of a core at steady state)" if steady is not None else ""),
                            f"kube-apiserver {cpu['apiserver']:.0f} CPU s, etcd {cpu['etcd']:.0f} CPU s",
                            f"{cpu['operator'] / max(cpu['apiserver'], 1e-9):.2f}x apiserver", "-", None))
    return out


def notes(plan: Plan, direct: dict[str, Any], op: dict[str, Any]) -> list[str]:
    out = [
        "Federations have spec.server.nodeAuthentication false: a Federation is Ready when its "
        "server Deployment has a ready replica and every site can join; kwok marks the server pod "
        "Ready, so that holds. With authentication on, Ready also needs every site key registered "
        "through a live Flower control API, which no simulated node serves: the Federation would "
        "stay Pending and no TrainingRound would get Jobs.",
        "TrainingRounds reach Running without a Flower server: the operator tries the control API "
        "at <federation>-server.<namespace>.svc:9092, which does not resolve from this host "
        "(FlowerUnavailable, at once), so no run is submitted; client Jobs are created anyway. "
        "Each pass still reads the run progress from the testbed's real S3 (a 404 per round).",
        f"direct: server-side apply by the operator's own client function (kube.apply), "
        f"{CLIENT_WORKERS} threads at once, of the children the operator would create (its own "
        "manifest functions), without owner references; it runs first, on the emptier cluster. "
        "Not kubectl: kubectl's client-side rate limit (client-go's 5 requests/s per process) "
        "held 4 parallel kubectls to 5 objects/s in all, its own limit, not the API server's.",
        "Latencies: from this process sending the create (or delete) to its watch seeing the child; "
        "the watches and the control plane share the machine with the operator.",
    ]
    tr, fed, rec = op.get("training_rounds", {}), op.get("federations", {}), op.get("recreate", {})
    if fed.get("create_to_ready", {}).get("n"):
        d = fed["create_to_ready"]
        out.append(f"Federation created -> Ready: p50 {d['p50']:.1f} s, p99 {d['p99']:.1f} s. The first pass "
                   "creates the Deployment and sees no ready replica; the Deployment's status change "
                   "wakes its Federation (handlers/level_triggered.py wake_owners_of), whose next pass "
                   "sees it Ready. A TrainingRound created before its Federation is Ready is woken by "
                   f"its own timer (every {RESYNC_SECONDS:g} s).")
    if rec.get("all", {}).get("n"):
        out.append(f"A deleted child wakes its owner at once (wake_owners_of on every kind it owns: "
                   "an annotation on the owner, from the child's ownerReferences), so it is back after "
                   f"one pass, not the {RESYNC_SECONDS:g} s timer: p99 {rec['all']['p99']:.1f} s.")
    one = op.get("one_at_a_time", {})
    if one.get("recreate", {}).get("n"):
        out.append(f"One at a time: after the bursts, on the same loaded cluster (every object still "
                   f"reconciled by its timer), {plan.probes} more Federations were created one after "
                   "another, each one's TrainingRound once it was Ready, then one of its Jobs and its "
                   "Deployment deleted, each step waited for. This is the operator's reaction time. "
                   "The burst figures are a queue: hundreds of creates arrive within seconds and each "
                   "waits for the passes ahead of it, on an API server the same burst keeps busy (the "
                   f"direct peer needed {direct['apply_seconds']:.0f} s to apply the same children "
                   "with nothing else to do).")
    if "steady" in op:
        s = op["steady"]
        m = op.get("reconcile_metrics", {})
        per = ", ".join(f"{k}: {v.get('passes', 0):.0f} passes, mean "
                        f"{v.get('mean_pass_seconds', 0) * 1000:.0f} ms"
                        + (f", {v['errors']:.0f} errors" if v.get("errors") else "") for k, v in m.items())
        cpu = s["cpu_seconds"]
        out.append(f"Steady state ({s['seconds']:g} s with nothing to change): operator "
                   f"{cpu.get('operator', 0):.1f} CPU s, kube-apiserver {cpu.get('apiserver', 0):.1f}, "
                   f"etcd {cpu.get('etcd', 0):.1f}. The timers still reconcile every "
                   f"TrainingRound under way every {RESYNC_SECONDS:g} s and every Ready Federation "
                   f"every {SETTLED_RESYNC_SECONDS:g} s "
                   f"({plan.training_rounds / RESYNC_SECONDS + plan.federations / SETTLED_RESYNC_SECONDS:.1f}"
                   " passes/s); a pass with nothing to change re-sends nothing (kube.AppliedCache). "
                   f"Reconcile passes over the run: {per}.")
    if op.get("log_summary"):
        ls = op["log_summary"]
        out.append(f"operator log: {ls['lines']:,} lines, {ls['errors']} with ERROR/Traceback, "
                   f"{ls['flower_unreachable']:,} 'Flower server not reachable'.")
    if op.get("error"):
        out.append(f"the operator phase stopped early: {op['error']}")
    if not tr.get("all_pods_scheduled", True) or not direct.get("all_pods_scheduled", True):
        out.append("NOT COMPLETE: the phase timed out before every pod was scheduled; the figures "
                   "are for what was reached (jobs_seen / pods_scheduled in the JSON).")
    loads = load_average()
    out.append(f"1-minute load average at the end: {loads[0]} on {os.cpu_count()} cores "
               "(the machine is shared; everything ran under nice -n 10).")
    return out


def report(plan: Plan, direct: dict[str, Any], op: dict[str, Any], heads: list[Headline],
           notes_: list[str]) -> None:
    print_table("operator scale: targets", ["case", "measured", "against", "ratio", "target", "verdict"],
                [[h.case, h.measured, h.against, h.ratio, h.target, h.verdict] for h in heads])
    print_notes(notes_)



def judge(result: dict[str, Any]) -> list[Headline]:
    """The headlines of a stored result, judged by this code (run.py --from-results)."""
    return headlines(Plan(**result["plan"]), result["direct"], result["operator"])

def run(mode: str, results_dir: Path) -> dict[str, Any]:
    started, load_before = time.monotonic(), load_average()
    plan = PLANS[mode]
    with tempfile.TemporaryDirectory(prefix="pollinate-operator-scale-") as tmp:
        work = Path(tmp)
        cluster = Cluster(plan, work)
        try:
            cluster.up()
            s3 = cluster.bed.s3()
            federations, rounds = custom_resources(plan, OPERATOR_NS, s3.endpoint)
            children = direct_children(federations, rounds, DIRECT_NS)
            usage = Usage({"apiserver": cluster.process("kube-apiserver"), "etcd": cluster.process("etcd")})
            direct = measure_direct(cluster, children, usage, plan)
            print(f"direct: {direct}", flush=True)
            op = measure_operator(cluster, federations, rounds, usage, plan, work)
            log_tail = (work / "operator.log").read_text(errors="replace").splitlines()[-20:]
        finally:
            cluster.down()
    heads = headlines(plan, direct, op)
    notes_ = notes(plan, direct, op)
    report(plan, direct, op, heads, notes_)
    op.pop("log", None)
    return write_result(NAME, mode, {
        "plan": asdict(plan),
        "method": "own testbed (kube-apiserver, etcd, controller-manager, scheduler, kwok; simulate "
                  "mode) with kwok GPU nodes; the operator as a process (python -m pollinate_operator, "
                  f"POLLINATE_RESYNC_SECONDS={RESYNC_SECONDS:g}, "
                  f"POLLINATE_SETTLED_RESYNC_SECONDS={SETTLED_RESYNC_SECONDS:g}); watches in the bench "
                  "process time every child; direct peer: server-side apply of the same children by "
                  "the operator's client function, 10 threads",
        "target": {"reconcile_p99_seconds": RECONCILE_P99_TARGET, "operator_rss_bytes": RSS_TARGET},
        "direct": direct,
        "operator": op,
        "operator_log_tail": log_tail,
        "headlines": heads,
        "notes": notes_,
    }, results_dir, started=started, load_before=load_before)


def main(argv: list[str] | None = None) -> None:
    args = parse_mode(__doc__.splitlines()[0], argv)
    # A TERM (kill, a CI timeout) unwinds like an error, so the testbed and operator are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(args.mode, args.results_dir)


if __name__ == "__main__":
    main()
