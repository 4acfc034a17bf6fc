"""The end-to-end path, for real: `make demo` (its driver, tools/demo/run.py) on a cluster whose
pods really run, then a laptop joining from outside the cluster through the Ingress (the
testbed's ingress controller), with TLS and its site key.

Only the container runtime is replaced (the testbed's node agent); the manifests, scheduling,
the Flower wire, S3 and the status are real."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from example_objects import example
from flower_processes import Site
from pod_security import restricted_violations
from pollinate_testbed import Ports, Testbed
from pollinate_testbed.outside import OutsideHost
from pollinate_testbed.testing import Kubectl, eventually
from prometheus_client.parser import text_string_to_metric_families
from secret_search import leaks, secret_forms

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.execute, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
OFFSET = "300"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Iterator[tuple[Testbed, Path]]:
    state = tmp_path_factory.mktemp("demo") / "testbed"
    env = {**os.environ, "POLLINATE_TESTBED_DIR": str(state), "POLLINATE_TESTBED_PORT_OFFSET": OFFSET}
    log = state.parent / "demo.log"
    # 10,000 characters a site (the demo's default is 40,000) and 2 local steps a round (the
    # example's 4): every round of every test here scores each site's held-out text and the
    # general text, and trains SmolLM2 at about 7 s of CPU a step; on two cores that is most
    # of the module's CPU. What is tested is the path, not how far the model learns.
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, str(ROOT / "tools/demo/run.py"), "--keep",
                                "--chars", "10000", "--local-steps", "2", "--timeout", "2400"],
                               env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    bed = Testbed(state_dir=state, ports=Ports(**{k: v + int(OFFSET) for k, v in Ports().__dict__.items()}))
    try:
        assert code == 0, log.read_text()[-4000:] + pod_logs(bed)
        yield bed, log
    finally:
        bed.down(quiet=True)


def pod_logs(bed: Testbed) -> str:
    """The last lines of every pod in the demo namespace: the cluster goes with the module."""
    k = Kubectl(bed, "demo")
    out = []
    for pod in k.json("get", "pods")["items"]:
        name = pod["metadata"]["name"]
        logs = k.run("logs", name, "--tail=25", check=False)
        out.append(f"\n--- {name}\n{logs.stdout}{logs.stderr}")
    return "".join(out)


def test_make_demo_trains_publishes_and_reports(demo) -> None:
    bed, log = demo
    output = log.read_text()
    report = Path(output.rsplit("report written to ", 1)[1].split()[0])
    assert report.exists()
    text = report.read_text()
    assert "phase: **Succeeded**" in text
    for plot in ("loss.png", "perplexity.png", "bytes.png"):
        assert (report.parent / plot).stat().st_size > 1000
    data = json.loads((report.parent / "status.json").read_text())
    status, rounds = data["status"], data["rounds"]
    assert status["progress"] == "3/3" and status["adapterVersion"] == "v1"
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["perplexity"] < rounds[0]["perplexity"]
    assert all(r["participants"] == 3 for r in rounds[1:])
    # Every site also scored the Federation's general held-out text (forgetting).
    assert all(r.get("generalPerplexity", 0) > 0 for r in rounds)
    k = Kubectl(bed, "demo")
    tr = k.json("get", "traininground", "notes-v1")
    assert tr["status"]["phase"] == "Succeeded"
    versions = bed.s3_client().list_objects_v2(Bucket=bed.s3().bucket, Prefix="clinical-notes/adapters/v1/")
    names = {o["Key"].rsplit("/", 1)[1] for o in versions.get("Contents", [])}
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json"} <= names


def diagnostics(k: Kubectl, laptop: Site) -> str:
    """The server's, hospital-a's and the laptop's last lines: the cluster and its logs are
    removed when the module ends."""
    parts = []
    for what in ("deployment/clinical-notes-server", "job/notes-v2-hospital-a"):
        out = k.run("logs", what, "--tail=40", check=False)
        parts.append(f"--- kubectl logs {what}\n{out.stdout}{out.stderr}")
    parts.append("--- laptop\n" + "\n".join(laptop.output().splitlines()[-40:]))
    return "\n".join(parts)


@dataclass
class Endpoint:
    """What `Site.join` needs of a server: an address and the CA file."""

    address: str
    ca_path: Path


def test_a_laptop_joins_from_outside_with_tls_and_its_site_key(demo, tmp_path: Path) -> None:
    bed, _ = demo
    k = Kubectl(bed, "demo")
    secret = k.json("get", "secret", "clinical-notes-site-alice-laptop")["data"]
    key = tmp_path / "site.key"
    key.write_bytes(base64.b64decode(secret["site.key"]))
    key.chmod(0o600)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(base64.b64decode(secret["ca.crt"]))
    # Exactly what a user reads: the Federation's endpoint and the address its Ingress
    # published, which the laptop's DNS (here its own hosts file) gives for the host.
    endpoint = k.json("get", "federation", "clinical-notes")["status"]["endpoint"]
    host = endpoint.rsplit(":", 1)[0]

    def ingress_address() -> str | None:
        lb = k.json("get", "ingress", "clinical-notes-server").get("status", {}).get("loadBalancer", {})
        return (lb.get("ingress") or [{}])[0].get("ip")

    address = eventually(ingress_address, timeout=60, what="the Ingress's published address")
    data = tmp_path / "notes"
    data.mkdir()
    from pollinate_runtime import corpora
    for f in corpora.site_corpus("fortunes-science", max_chars=10_000).iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    machine = OutsideHost(bed.network, {host: address}).start()
    laptop = Site("alice-laptop", data, tmp_path / "work", key)
    laptop.join(Endpoint(endpoint, ca), on=machine.command)  # type: ignore[arg-type]
    try:
        tr = example("traininground")
        tr["metadata"]["name"] = "notes-v2"
        tr["spec"].update({"rounds": 1, "sites": ["hospital-a", "alice-laptop"], "minSites": 2,
                           "initialAdapterVersion": "v1"})
        tr["spec"]["local"]["maxSteps"] = 2
        k.apply(yaml.safe_dump(tr))

        def finished() -> dict | None:
            st = k.json("get", "traininground", "notes-v2").get("status", {})
            return st if st.get("phase") in ("Succeeded", "Failed") else None

        st = eventually(finished, timeout=1800, interval=3, what="notes-v2 finished")
        assert st["phase"] == "Succeeded", (st.get("conditions"), diagnostics(k, laptop))
        assert st["metrics"][-1]["participants"] == 2
        assert {s["name"]: s["state"] for s in st["sites"]}["alice-laptop"] == "External"
        assert st["adapterVersion"] == "v2"
        assert "round 1: done" in laptop.output()
        # Its requests went through the ingress controller (its access log names the laptop).
        assert machine.address in (bed.log_dir / "ingress-controller.log").read_text()
    finally:
        laptop.stop()
        machine.stop()


# A POST as a Flower client sends it: prints the status and the start of the body, or why no
# HTTP answer came. A fourth argument skips the name check (a pod's address is in no
# certificate); the Federation's CA must still sign whatever answers.
PROBE = """
import http.client, ssl, sys, urllib.parse
ca, url = sys.argv[1], urllib.parse.urlsplit(sys.argv[2])
try:
    if url.scheme == "https":
        context = ssl.create_default_context(cafile=ca)
        context.check_hostname = len(sys.argv) < 4
        conn = http.client.HTTPSConnection(url.hostname, url.port or 443, context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
    conn.request("POST", url.path, body=b"", headers={"Content-Type": "application/protobuf"})
    response = conn.getresponse()
    print(response.status, response.read(200).decode(errors="replace").replace(chr(10), " "))
except (OSError, http.client.HTTPException) as err:
    print("no-answer", type(err).__name__, err)
"""
FLEET, CONTROL, RUNTIME = "/v1/fleet/get-run", "/v1/control/list-runs", "/v1/runtime/acquire-task"
SPELLINGS = ("/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
             "/v1/fleet/..%2fcontrol/list-nodes", "/v1/fleet/%2E%2E/runtime/acquire-task",
             "/v1/fleet//../runtime/acquire-task", "/v1/FLEET/../control/start-run")


def test_the_ingress_passes_only_flowers_fleet_api_and_only_over_tls(demo, tmp_path: Path) -> None:
    """Flower serves its fleet, control and runtime APIs on one port. Through the operator's
    Ingress, from outside the cluster, only the fleet path reaches the server: the control
    and runtime paths get the ingress controller's 404, and other spellings of them (`..`,
    encoded) never reach Flower; plain HTTP reaches nothing. At the server pod's address,
    from the pod network (where any pod could call from), the server's gate refuses a control
    call without the operator's token (401) and every runtime call (403)."""
    bed, _ = demo
    k = Kubectl(bed, "demo")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(base64.b64decode(k.json("get", "secret", "clinical-notes-server-tls")["data"]["ca.crt"]))
    host = k.json("get", "federation", "clinical-notes")["status"]["endpoint"].rsplit(":", 1)[0]
    lb = k.json("get", "ingress", "clinical-notes-server")["status"]["loadBalancer"]
    address = lb["ingress"][0]["ip"]
    selector = "app.kubernetes.io/instance=clinical-notes,app.kubernetes.io/component=server"
    (server_pod,) = [p for p in k.json("get", "pods", "-l", selector)["items"]
                     if p["status"].get("phase") == "Running"]
    server = f"{server_pod['status']['podIP']}:9092"

    def direct(path: str, scheme: str = "https") -> str:
        argv = [sys.executable, "-c", PROBE, str(ca), f"{scheme}://{server}{path}", "pod-address"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()

    with OutsideHost(bed.network, {host: address}) as laptop:
        def outside(url: str) -> str:
            argv = laptop.command([sys.executable, "-c", PROBE, str(ca), url])
            return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip()

        answers = {path: (outside(f"https://{host}{path}"), direct(path))
                   for path in (FLEET, CONTROL, RUNTIME)}
        spellings = {path: outside(f"https://{host}{path}") for path in SPELLINGS}
        plain_https_port = outside(f"http://{host}:443{FLEET}")
        plain_http_port = outside(f"http://{host}{FLEET}")
    plain_server = direct(FLEET, scheme="http")

    def status(answer: str) -> str:
        return (answer.split() or [""])[0]

    through, at_server = answers[FLEET]
    # The fleet path reaches Flower: the same answer as the server gives (it refuses an
    # unauthenticated, empty request), not the controller's 404.
    assert status(through) == status(at_server) and status(through) not in ("404", "no-answer"), answers
    for path, refused in ((CONTROL, "401"), (RUNTIME, "403")):
        through, at_server = answers[path]
        assert status(at_server) == refused and "pollinate server:" in at_server, (path, at_server)
        assert status(through) == "404", (path, through)  # the Ingress does not route it
    for path, answer in spellings.items():
        # The controller's 404, or the server gate's 400 for a path not in canonical form.
        assert status(answer) in ("400", "404"), (path, answer)
    assert status(plain_https_port) in ("400", "404"), plain_https_port
    assert status(plain_https_port) != status(answers[FLEET][0]), plain_https_port
    assert status(plain_http_port) == "no-answer", plain_http_port  # no plain HTTP port at all
    assert status(plain_server) == "no-answer", plain_server  # the server speaks only TLS

    # The pod counts the gate's refusals on its own metrics port, plain HTTP for Prometheus
    # (the host reaches the pod network as a scraper would).
    url = f"http://{server_pod['status']['podIP']}:9190/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        families = text_string_to_metric_families(response.read().decode())
    refused: dict[str, float] = {}
    for sample in (x for f in families for x in f.samples
                   if x.name == "pollinate_server_refused_requests_total"):
        refused[sample.labels["api"]] = refused.get(sample.labels["api"], 0.0) + sample.value
    assert refused.get("control", 0) >= 1 and refused.get("runtime", 0) >= 1, refused


def test_the_operators_pods_are_admitted_under_the_restricted_pod_security_standard(demo) -> None:
    """The pods that really run (the operator, the Flower server, a client Job's): their
    specs meet the restricted standard, and with the demo namespace enforcing it (the API
    server's own PodSecurity admission) a new TrainingRound's client pod is still admitted."""
    bed, _ = demo
    cluster = Kubectl(bed)
    k = Kubectl(bed, "demo")
    enforce = "pod-security.kubernetes.io/enforce"
    # The API server's check of the pods already running: no warning for any of them.
    for ns in ("demo", "pollinate-system"):
        dry_run = cluster.run("label", "--dry-run=server", "--overwrite", "namespace", ns,
                              f"{enforce}=restricted")
        assert "violate" not in dry_run.stderr, dry_run.stderr
    tr = example("traininground")
    tr["metadata"]["name"] = "notes-psa"
    psa_pods = "pollinate.dev/traininground=notes-psa"
    tr["spec"].update({"rounds": 1, "sites": ["hospital-a"], "minSites": 1})
    cluster.run("label", "--overwrite", "namespace", "demo", f"{enforce}=restricted")
    try:
        bare = k.run("run", "bare", "--image=busybox", "--restart=Never", "--command", "--", "true",
                     check=False)
        assert bare.returncode != 0 and "violates PodSecurity" in bare.stderr, bare.stderr  # enforced
        k.apply(yaml.safe_dump(tr))
        client = eventually(lambda: k.json("get", "pods", "-l", psa_pods)["items"], timeout=120,
                            what="the client pod admitted under restricted")
    finally:
        k.run("delete", "traininground", "notes-psa", "--wait=false", check=False)
        cluster.run("label", "namespace", "demo", f"{enforce}-", check=False)
    pods = [*client, *(p for ns in ("demo", "pollinate-system")
                       for p in cluster.json("get", "pods", "-n", ns)["items"])]
    components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
    assert {"server", "site-client", "operator"} <= components, components
    problems = [problem for pod in pods for problem in restricted_violations(pod)]
    assert not problems, "\n".join(problems)
    eventually(lambda: not k.json("get", "jobs", "-l", psa_pods)["items"],
               timeout=120, what="notes-psa's Job gone")


def test_no_secret_shows_in_any_pods_log_events_or_status_after_real_runs(demo) -> None:
    """After the demo's real run: the operator's and the Flower server's logs, every container
    log the node agent kept for the demo's pods (the finished client Jobs' included), all
    Events and all statuses hold no private key of the Federation and not the S3 secret key."""
    bed, _ = demo
    cluster = Kubectl(bed)
    k = Kubectl(bed, "demo")
    values: dict[str, set[str]] = {}
    for secret in k.json("get", "secrets", "-l", "pollinate.dev/federation=clinical-notes")["items"]:
        for key, data in secret["data"].items():
            if key in ("site.key", "ca.key", "tls.key"):
                values[f"{secret['metadata']['name']}/{key}"] = secret_forms(base64.b64decode(data))
    assert len(values) == 6, sorted(values)  # CA, server, four sites
    values["s3-credentials"] = secret_forms(bed.s3().secret_key.encode())
    places: dict[str, str] = {}
    for ns, what in (("demo", "deployment/clinical-notes-server"),
                     ("pollinate-system", "deployment/pollinate")):
        out = cluster.run("logs", "-n", ns, what, "--all-containers")
        assert out.stdout.strip(), f"{what} logged nothing"
        places[f"kubectl logs {what}"] = out.stdout
    kept = [f for f in (bed.agent_dir / "logs").rglob("*.log")
            if f.relative_to(bed.agent_dir / "logs").parts[0].startswith(("demo_", "pollinate-system_"))]
    assert any("notes-v1-hospital-a" in str(f) for f in kept), kept  # a client's log is among them
    places |= {f"container log {f.relative_to(bed.agent_dir)}": f.read_text(errors="replace") for f in kept}
    places["Events"] = cluster.run("get", "events", "-A", "-o", "yaml").stdout
    places["Federations and TrainingRounds"] = cluster.run(
        "get", "federations,trainingrounds", "-A", "-o", "yaml").stdout
    found = leaks(values, places)
    assert not found, "secrets outside their Secrets:\n" + "\n".join(found)


def test_a_deleted_server_pod_comes_back_and_the_run_resumes_from_its_checkpoint(demo) -> None:
    bed, _ = demo
    k = Kubectl(bed, "demo")
    tr = example("traininground")
    tr["metadata"]["name"] = "notes-v3"
    # The pod is deleted once round 1 is checkpointed: two rounds are left to resume. One local
    # step a round: what is tested is the resume, not learning.
    tr["spec"]["rounds"] = 3
    tr["spec"]["local"]["maxSteps"] = 1
    k.apply(yaml.safe_dump(tr))
    selector = "app.kubernetes.io/instance=clinical-notes,app.kubernetes.io/component=server"

    def status() -> dict:
        return k.json("get", "traininground", "notes-v3").get("status", {})

    eventually(lambda: status().get("round", 0) >= 1, timeout=1800, interval=3, what="notes-v3 round 1")
    (old_pod,) = [p["metadata"]["name"] for p in k.json("get", "pods", "-l", selector)["items"]]
    # The server's state (its runs and registered keys) lives in the pod: all of it goes.
    k.run("delete", "pod", old_pod, "--wait=false")

    def finished() -> dict | None:
        st = status()
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = eventually(finished, timeout=2400, interval=5, what="notes-v3 finished after the server restart")
    assert st["phase"] == "Succeeded", st.get("conditions")
    # Every round once: none lost with the server, none counted twice after the resume.
    assert [m["round"] for m in st["metrics"]] == [0, 1, 2, 3]
    new_pods = [p["metadata"]["name"] for p in k.json("get", "pods", "-l", selector)["items"]]
    assert new_pods and old_pod not in new_pods
    events = k.json("get", "events", "--field-selector", "involvedObject.name=notes-v3")["items"]
    assert "RunResubmitted" in {e["reason"] for e in events}, [e["reason"] for e in events]
    # The status says so too: a second submission, continuing after a checkpointed round.
    assert st.get("runSubmissions", 0) >= 2 and st.get("resumedFromRound", 0) >= 1, st
