"""The operator drives a real Flower server: it registers the site keys it generated, submits
the run through Flower's control API, and carries round progress from S3 into the
TrainingRound's status, up to Succeeded with the published adapter version.

The SuperLink runs on loopback with the certificate the operator generated (it names
127.0.0.1), and the operator reaches it there (POLLINATE_FLOWER_ADDRESS); the sites join with
the keys from their Secrets, as `pollinate-client join` on a laptop would."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from flower_processes import FlowerServer, Site, free_port
from operator_process import OperatorProcess
from pollinate_testbed import Testbed
from pollinate_testbed.testing import Kubectl, eventually
from tiny_lm import docstring_corpus

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = {"hospital-a": ("pathlib", "shutil"), "hospital-b": ("datetime", "calendar"),
           "clinic-c": ("re", "string")}


def secret_file(kubectl: Kubectl, name: str, key: str, path: Path) -> Path:
    data = kubectl.json("get", "secret", name)["data"][key]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(data))
    path.chmod(0o600)
    return path


@pytest.fixture
def flower_port() -> int:
    return free_port()


@pytest.fixture
def driven_operator(testbed: Testbed, crds: None, flower_port: int,
                    tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(testbed, tmp_path / "operator.log",
                         {"POLLINATE_FLOWER_ADDRESS": f"127.0.0.1:{flower_port}"})
    op.start()
    yield op
    op.stop()


@dataclass
class Hub:
    """A Federation the operator manages, its SuperLink on loopback and three joined sites."""

    server: FlowerServer
    sites: list[Site]


@contextmanager
def flower_hub(testbed: Testbed, kubectl: Kubectl, flower_port: int, tiny_model_dir: Path,
               tmp_path: Path) -> Iterator[Hub]:
    s3 = testbed.s3()
    kubectl.run("create", "secret", "generic", "s3-credentials",
                f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}")
    fed = yaml.safe_load((ROOT / "examples/federation.yaml").read_text())
    fed["spec"]["baseModel"] = {"uri": str(tiny_model_dir)}
    fed["spec"]["adapter"] = {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}
    fed["spec"]["storage"]["s3"]["endpoint"] = s3.endpoint
    fed["spec"]["storage"]["s3"]["prefix"] = f"operator-flower/{kubectl.namespace}"
    fed["spec"]["sites"] = [s for s in fed["spec"]["sites"] if not s.get("external")]
    kubectl.apply(yaml.safe_dump(fed))

    # The server runs here, with the certificate the operator generated for it.
    eventually(lambda: kubectl.run("get", "secret", "clinical-notes-server-tls", check=False)
               .returncode == 0, what="server TLS secret")
    home = tmp_path / "superlink"
    for key in ("ca.crt", "tls.crt", "tls.key"):
        secret_file(kubectl, "clinical-notes-server-tls", key, home / key)
    server = FlowerServer(home, env={"AWS_ACCESS_KEY_ID": s3.access_key,
                                     "AWS_SECRET_ACCESS_KEY": s3.secret_key}, port=flower_port)
    server.start()
    hub = Hub(server, [])
    try:
        def federation_ready() -> dict | None:
            st = kubectl.json("get", "federation", "clinical-notes").get("status", {})
            return st if st.get("phase") == "Ready" else None

        st = eventually(federation_ready, timeout=90, what="Federation Ready (site keys registered)")
        assert st["sitesSummary"] == "3/3"
        assert all(s["registered"] and s["nodeId"] for s in st["sites"])

        for name, modules in DOMAINS.items():
            data = tmp_path / "data" / name
            data.mkdir(parents=True)
            (data / "notes.txt").write_text("\n\n".join(docstring_corpus(modules)))
            key = secret_file(kubectl, f"clinical-notes-site-{name}", "site.key", tmp_path / "keys" / name)
            site = Site(name, data, tmp_path / "work" / name, key)
            site.join(server)
            hub.sites.append(site)
        yield hub
    finally:
        for site in hub.sites:
            site.stop()
        server.stop()


def training_round(name: str = "notes-v1", **spec: object) -> dict:
    tr = yaml.safe_load((ROOT / "examples/traininground.yaml").read_text())
    tr["metadata"]["name"] = name
    tr["spec"].update({"rounds": 2, "minSites": 3, "roundTimeoutSeconds": 120,
                       "local": {"maxSteps": 4, "batchSize": 4, "learningRate": 0.005,
                                 "sequenceLength": 64}, **spec})
    return tr


def test_operator_runs_a_training_round_on_a_real_flower_server(
        testbed: Testbed, driven_operator: OperatorProcess, kubectl: Kubectl, flower_port: int,
        tiny_model_dir: Path, tmp_path: Path) -> None:
    with flower_hub(testbed, kubectl, flower_port, tiny_model_dir, tmp_path) as hub:
        server = hub.server
        tr = training_round()
        kubectl.apply(yaml.safe_dump(tr))

        def status() -> dict:
            return kubectl.json("get", "traininground", "notes-v1").get("status", {})

        running = eventually(lambda: status().get("runId") and status(), timeout=60, what="run submitted")
        assert running["phase"] == "Running"
        mid = eventually(lambda: (st := status()).get("round", 0) >= 1 and st, timeout=300,
                         what="round 1 in status")
        assert mid["progress"] in ("1/2", "2/2")
        done = eventually(lambda: (st := status()).get("phase") in ("Succeeded", "Failed") and st,
                          timeout=300, what="TrainingRound finished")
        assert done["phase"] == "Succeeded", done.get("conditions")
        assert done["progress"] == "2/2"
        assert done["adapterVersion"].startswith("v")
        assert [m["round"] for m in done["metrics"]] == [0, 1, 2]
        assert done["metrics"][-1]["perplexity"] > 0
        assert done["lastPerplexity"] == done["metrics"][-1]["perplexity"]
        assert done["completionTime"]
        reasons = {e["reason"] for e in kubectl.json(
            "get", "events", "--field-selector", "involvedObject.name=notes-v1")["items"]}
        assert {"RunSubmitted", "RoundCompleted", "RunCompleted"} <= reasons
        # The run's end frees the GPUs: the client Jobs are gone.
        eventually(lambda: not kubectl.json("get", "jobs")["items"], what="client Jobs deleted")
        out = kubectl.run("get", "trainingrounds").stdout
        assert "Succeeded" in out and "2/2" in out

        # Deleting a TrainingRound stops its Flower run (its S3 data stays).
        tr["metadata"]["name"] = "notes-v2"
        tr["spec"]["rounds"] = 50
        kubectl.apply(yaml.safe_dump(tr))
        def submitted() -> str | None:
            st = kubectl.json("get", "traininground", "notes-v2").get("status", {})
            if not st.get("runId"):
                print("notes-v2 status:", st.get("phase"), st.get("conditions"))
            return st.get("runId")

        run_id = int(eventually(submitted, timeout=90, interval=5, what="notes-v2 submitted"))
        kubectl.run("delete", "traininground", "notes-v2", "--timeout=60s")

        def stopped() -> bool:
            with server.control() as control:
                state = control.get_run(run_id)
            return bool(state and state.finished and state.sub_status == "stopped")

        eventually(stopped, timeout=60, what="Flower run stopped")


# Seconds after each operator start at which it is killed: from mid-start-up (about 2 s here)
# through its first reconciling passes (resync every 2 s).
KILL_AFTER = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0)


def test_operator_killed_twenty_times_during_a_run_leaves_one_run_and_no_duplicates(
        testbed: Testbed, driven_operator: OperatorProcess, kubectl: Kubectl, flower_port: int,
        tiny_model_dir: Path, tmp_path: Path) -> None:
    with flower_hub(testbed, kubectl, flower_port, tiny_model_dir, tmp_path) as hub:
        kubectl.apply(yaml.safe_dump(training_round(rounds=3)))

        def status() -> dict:
            return kubectl.json("get", "traininground", "notes-v1").get("status", {})

        seen: list[str] = []
        most_jobs = 0
        for i in range(20):
            time.sleep(KILL_AFTER[i % len(KILL_AFTER)])
            driven_operator.kill()
            st = status()
            seen.append(f"{st.get('phase')} {st.get('progress')}")
            most_jobs = max(most_jobs, len(kubectl.json("get", "jobs")["items"]))
            driven_operator.start()
        done = eventually(lambda: (st := status()).get("phase") in ("Succeeded", "Failed") and st,
                          timeout=600, what="TrainingRound finished after 20 kills")
        assert done["phase"] == "Succeeded", (done.get("conditions"), seen)
        # The kills fell at different points of the run, not all before it started.
        assert len(set(seen)) >= 3, seen
        assert most_jobs <= 3, "a restarted operator created a duplicate client Job"
        with hub.server.control() as control:
            runs = [r for r in control.list_runs() if r.override_config.get("training-round") == "notes-v1"
                    and r.override_config.get("namespace") == kubectl.namespace]
        assert [str(r.run_id) for r in runs] == [done["runId"]], "the run was submitted more than once"
        assert [m["round"] for m in done["metrics"]] == [0, 1, 2, 3]
        assert done["adapterVersion"] == "v1"
        listing = testbed.s3_client().list_objects_v2(
            Bucket=testbed.s3().bucket, Prefix=f"operator-flower/{kubectl.namespace}/adapters/")
        versions = {o["Key"].split("/adapters/")[1].split("/")[0] for o in listing.get("Contents", [])}
        assert versions == {"v1"}, versions
        assert len(kubectl.json("get", "deployments")["items"]) == 1
        eventually(lambda: not kubectl.json("get", "jobs")["items"], what="client Jobs deleted")
