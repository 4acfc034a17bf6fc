"""The operator drives a real Flower server: it registers the site keys it generated, submits
the run through Flower's control API, and carries round progress from S3 into the
TrainingRound's status, up to Succeeded with the published adapter version.

The SuperLink runs on loopback with the certificate the operator generated (it names
127.0.0.1), and the operator reaches it there (POLLINATE_FLOWER_ADDRESS); the sites join with
the keys from their Secrets, as `pollinate-client join` on a laptop would."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from example_objects import create_s3_secret, example
from flower_processes import FlowerServer, Site, free_port
from operator_process import OperatorProcess
from pollinate_operator import pki
from pollinate_runtime.store import FederationStore, ObjectStore
from pollinate_testbed import Testbed
from pollinate_testbed.testing import Kubectl, eventually
from tiny_lm import docstring_corpus

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

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
                         {"POLLINATE_FLOWER_ADDRESS": f"127.0.0.1:{flower_port}",
                          "POLLINATE_SETTLED_RESYNC_SECONDS": str(SETTLED_RESYNC)})
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
    create_s3_secret(kubectl)
    fed = example("federation")
    fed["spec"]["baseModel"] = {"uri": str(tiny_model_dir)}
    fed["spec"]["adapter"] = {"rank": 4, "alpha": 8, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}
    fed["spec"]["storage"]["s3"]["endpoint"] = s3.endpoint
    fed["spec"]["storage"]["s3"]["prefix"] = f"operator-flower/{kubectl.namespace}"
    fed["spec"]["sites"] = [s for s in fed["spec"]["sites"] if not s.get("external")]
    kubectl.apply(yaml.safe_dump(fed))

    # The server runs here, with the certificate the operator generated for it.
    for secret in ("clinical-notes-server-tls", "clinical-notes-control-token"):
        eventually(lambda: kubectl.run("get", "secret", secret, check=False).returncode == 0,  # noqa: B023
                   what=f"secret {secret}")
    home = tmp_path / "superlink"
    for key in ("ca.crt", "tls.crt", "tls.key"):
        secret_file(kubectl, "clinical-notes-server-tls", key, home / key)
    # The token the operator made for this Federation, as the server pod mounts it.
    token = secret_file(kubectl, "clinical-notes-control-token", "token", home / "control-token")
    server = FlowerServer(home, env={"AWS_ACCESS_KEY_ID": s3.access_key,
                                     "AWS_SECRET_ACCESS_KEY": s3.secret_key}, port=flower_port,
                          control_token=token.read_text())
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
    tr = example("traininground")
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
        # What the server measured per round reaches the status, not only perplexity.
        for entry in done["metrics"][1:]:
            assert entry["participants"] == 3, entry
            assert entry["bytesSent"] > 0 and entry["bytesReceived"] > 0 and entry["seconds"] > 0, entry
            assert entry["trainLoss"] > 0, entry
        assert done["lastPerplexity"] == done["metrics"][-1]["perplexity"]
        assert done["completionTime"]
        reasons = {e["reason"] for e in kubectl.json(
            "get", "events", "--field-selector", "involvedObject.name=notes-v1")["items"]}
        assert {"RunSubmitted", "RoundCompleted", "RunCompleted"} <= reasons
        # The run's end frees the GPUs: the client Jobs are gone.
        eventually(lambda: not kubectl.json("get", "jobs")["items"], what="client Jobs deleted")
        out = kubectl.run("get", "trainingrounds").stdout
        assert "Succeeded" in out and "2/2" in out
        assert done["runSubmissions"] == 1 and "resumedFromRound" not in done

        # The Federation shows the newest adapter version in S3: the one this run published.
        fed = eventually(lambda: (st := kubectl.json("get", "federation", "clinical-notes")["status"])
                         .get("latestAdapterVersion") and st, timeout=60, what="latestAdapterVersion")
        assert fed["latestAdapterVersion"] == done["adapterVersion"]
        row = kubectl.run("get", "federation", "clinical-notes").stdout.splitlines()[1].split()
        assert row[4] == done["adapterVersion"]  # NAME PHASE ENDPOINT SITES LATEST-ADAPTER AGE

        # Deleted and created again under its name: a new run (keyed by the new uid) that
        # trains from round 0 and publishes the next version; the old version stays.
        old_uid = kubectl.json("get", "traininground", "notes-v1")["metadata"]["uid"]
        kubectl.run("delete", "traininground", "notes-v1", "--timeout=60s")
        kubectl.apply(yaml.safe_dump(tr))
        again = eventually(lambda: (st := status()).get("phase") in ("Succeeded", "Failed") and st,
                           timeout=300, what="the re-created TrainingRound finished")
        assert kubectl.json("get", "traininground", "notes-v1")["metadata"]["uid"] != old_uid
        assert again["phase"] == "Succeeded", again.get("conditions")
        assert again["runKey"] != done["runKey"] and again["runId"] != done["runId"]
        assert int(again["adapterVersion"][1:]) == int(done["adapterVersion"][1:]) + 1
        assert [m["round"] for m in again["metrics"]] == [0, 1, 2] and "resumedFromRound" not in again
        store = FederationStore(ObjectStore(testbed.s3_client(), testbed.s3().bucket,
                                            f"operator-flower/{kubectl.namespace}"))
        assert store.adapter_manifest(int(done["adapterVersion"][1:]))["trainingRound"] == done["runKey"]

        # Deleting a TrainingRound stops its Flower run and removes its Jobs; its S3 data stays.
        tr["metadata"]["name"] = "notes-v2"
        tr["spec"]["rounds"] = 50
        kubectl.apply(yaml.safe_dump(tr))

        def v2_status() -> dict:
            return kubectl.json("get", "traininground", "notes-v2").get("status", {})

        run_id = int(eventually(lambda: v2_status().get("runId"), timeout=90, interval=2,
                                what="notes-v2 submitted"))
        eventually(lambda: v2_status().get("round", 0) >= 1, timeout=300, what="notes-v2 round 1")
        key = v2_status()["runKey"]  # notes-v2 and the start of its uid: its folders in S3
        assert key.startswith("notes-v2-") and len(key) == len("notes-v2-") + 8
        v2_jobs = ["get", "jobs", "-l", "pollinate.dev/traininground=notes-v2"]
        assert len(kubectl.json(*v2_jobs)["items"]) == 3
        store = FederationStore(ObjectStore(testbed.s3_client(), testbed.s3().bucket,
                                            f"operator-flower/{kubectl.namespace}"))
        kept = store.objects.list(f"checkpoints/{key}/") + store.objects.list(f"runs/{key}/")
        assert f"runs/{key}/progress.json" in kept and f"checkpoints/{key}/latest.json" in kept
        kubectl.run("delete", "traininground", "notes-v2", "--timeout=60s")

        def stopped() -> bool:
            with server.control() as control:
                state = control.get_run(run_id)
            return bool(state and state.finished and state.sub_status == "stopped")

        eventually(stopped, timeout=60, what="Flower run stopped")
        eventually(lambda: not kubectl.json(*v2_jobs)["items"], what="notes-v2 Jobs removed")
        assert set(kept) <= set(store.objects.list(f"checkpoints/{key}/")
                                + store.objects.list(f"runs/{key}/")), "S3 data of notes-v2 deleted"
        assert store.read_progress(key).round >= 1


def test_a_suspended_round_resumes_after_its_last_checkpoint_without_redoing_rounds(
        testbed: Testbed, driven_operator: OperatorProcess, kubectl: Kubectl, flower_port: int,
        tiny_model_dir: Path, tmp_path: Path) -> None:
    with flower_hub(testbed, kubectl, flower_port, tiny_model_dir, tmp_path) as hub:
        rounds = 4
        kubectl.apply(yaml.safe_dump(training_round(rounds=rounds)))

        def status() -> dict:
            return kubectl.json("get", "traininground", "notes-v1").get("status", {})

        first = eventually(lambda: (st := status()).get("round", 0) >= 1 and st, timeout=300,
                           what="round 1 done")
        kubectl.run("patch", "traininground", "notes-v1", "--type=merge", "-p", '{"spec":{"suspend":true}}')
        eventually(lambda: status().get("phase") == "Suspended", what="Suspended")
        eventually(lambda: not kubectl.json("get", "jobs")["items"], what="client Jobs deleted")

        def first_run_stopped() -> bool:
            with hub.server.control() as control:
                state = control.get_run(int(first["runId"]))
            return bool(state and state.finished and state.sub_status == "stopped")

        eventually(first_run_stopped, timeout=60, what="the first Flower run stopped")
        store = FederationStore(ObjectStore(testbed.s3_client(), testbed.s3().bucket,
                                            f"operator-flower/{kubectl.namespace}"))
        key = first["runKey"]

        def settled_checkpoint() -> int | None:
            before = store.latest_checkpoint_pointer(key)
            time.sleep(5)  # a server app still finishing a checkpoint would move the pointer
            after = store.latest_checkpoint_pointer(key)
            return after.round if after and before and after.round == before.round else None

        k = eventually(settled_checkpoint, timeout=60, what="checkpoint pointer settled")
        assert 1 <= k < rounds, f"the run went to round {k} before it was suspended"
        progress_round = store.read_progress(key).round
        resumed_at = dt.datetime.now(dt.UTC)
        kubectl.run("patch", "traininground", "notes-v1", "--type=merge", "-p", '{"spec":{"suspend":false}}')

        done = eventually(lambda: (st := status()).get("phase") in ("Succeeded", "Failed") and st,
                          timeout=600, what="TrainingRound finished after the resume")
        assert done["phase"] == "Succeeded", done.get("conditions")
        assert done["runSubmissions"] == 2
        assert done["resumedFromRound"] == progress_round
        assert done["runId"] != first["runId"]
        assert [m["round"] for m in done["metrics"]] == list(range(rounds + 1))
        # Rounds up to k were not redone: their checkpoints predate the resume, the others follow it.
        listing = testbed.s3_client().list_objects_v2(
            Bucket=testbed.s3().bucket, Prefix=f"operator-flower/{kubectl.namespace}/checkpoints/{key}/")
        written = {int(o["Key"].split("/round-")[1].split("/")[0]): o["LastModified"]
                   for o in listing["Contents"] if o["Key"].endswith("/manifest.json")}
        assert sorted(written) == list(range(1, rounds + 1))
        assert all(written[j] < resumed_at for j in range(1, k + 1)), (k, resumed_at, written)
        assert all(written[j] >= resumed_at - dt.timedelta(seconds=1) for j in range(k + 1, rounds + 1))
        with hub.server.control() as control:
            runs = {str(r.run_id): r for r in control.list_runs()
                    if r.override_config.get("training-round") == "notes-v1"}
        assert set(runs) == {first["runId"], done["runId"]}
        reasons = {e["reason"] for e in kubectl.json(
            "get", "events", "--field-selector", "involvedObject.name=notes-v1")["items"]}
        assert {"Suspended", "Resumed", "RunCompleted"} <= reasons


def test_the_server_holds_exactly_the_current_keys_of_the_federations_sites(
        testbed: Testbed, driven_operator: OperatorProcess, kubectl: Kubectl, flower_port: int,
        tiny_model_dir: Path, tmp_path: Path) -> None:
    with flower_hub(testbed, kubectl, flower_port, tiny_model_dir, tmp_path) as hub:
        def public_key(site: str) -> bytes:
            data = kubectl.json("get", "secret", f"clinical-notes-site-{site}")["data"]["site.pub"]
            return pki.public_key_pem(base64.b64decode(data))

        def public_key_or_none(site: str) -> bytes | None:
            found = kubectl.run("get", "secret", f"clinical-notes-site-{site}", check=False)
            return public_key(site) if found.returncode == 0 else None

        def registered() -> dict[bytes, str]:
            with hub.server.control() as control:
                return {n.public_key_pem: n.node_id for n in control.nodes() if n.status != "unregistered"}

        keys = {site: public_key(site) for site in DOMAINS}
        assert set(keys.values()) <= set(registered())
        sites = kubectl.json("get", "federation", "clinical-notes")["spec"]["sites"]
        index = [s["name"] for s in sites].index("clinic-c")
        kubectl.run("patch", "federation", "clinical-notes", "--type=json",
                    "-p", f'[{{"op": "remove", "path": "/spec/sites/{index}"}}]')

        eventually(lambda: keys["clinic-c"] not in registered(), timeout=60,
                   what="clinic-c's key unregistered from the SuperLink")
        assert {keys["hospital-a"], keys["hospital-b"]} <= set(registered())
        # Its key is forgotten only once the server no longer accepts it.
        eventually(lambda: kubectl.run("get", "secret", "clinical-notes-site-clinic-c", check=False)
                   .returncode != 0, what="clinic-c's key Secret deleted")
        st = eventually(lambda: (st := kubectl.json("get", "federation", "clinical-notes")["status"])
                        .get("sitesSummary") == "2/2" and st, what="Federation of two sites")
        assert st["phase"] == "Ready"
        assert [s["name"] for s in st["sites"]] == ["hospital-a", "hospital-b"]

        # A key registered by anyone but the operator (here with the control API itself, under
        # a site's name) is unregistered: the server holds only the Federation's site keys.
        # Nothing in Kubernetes changes, so a Ready Federation sees it at its settled resync
        # (SETTLED_RESYNC here; the operator's default is 60 s): SETTLED.
        intruder = pki.public_key_pem(pki.new_site_key().public_openssh)
        with hub.server.control() as control:
            control.register_site("hospital-a", intruder)
        eventually(lambda: intruder not in registered(), timeout=SETTLED,
                   what="the intruder's key unregistered")

        # Rotation: a site's Secret deleted gets a new key, and its old key is refused (the
        # deletion wakes the Federation: test_operator.py shows it without the resync).
        kubectl.run("delete", "secret", "clinical-notes-site-hospital-b")
        rotated = eventually(lambda: (k := public_key_or_none("hospital-b")) not in (None, keys["hospital-b"])
                             and k, timeout=SETTLED, what="hospital-b's new key")
        eventually(lambda: keys["hospital-b"] not in registered() and rotated in registered(),
                   timeout=SETTLED, what="hospital-b's old key unregistered and its new one registered")

        # A site that brings its own public key: registered, and no private key is kept for it.
        laptop = pki.new_site_key()
        kubectl.run("patch", "federation", "clinical-notes", "--type=json", "-p", json.dumps([
            {"op": "add", "path": "/spec/sites/-", "value": {
                "name": "dana-laptop", "external": True,
                "publicKey": laptop.public_openssh.decode() + " dana@laptop"}}]))
        given = pki.public_key_pem(laptop.public_openssh)
        eventually(lambda: given in registered(), timeout=SETTLED, what="dana-laptop's own key registered")
        stored = kubectl.json("get", "secret", "clinical-notes-site-dana-laptop")["data"]
        assert sorted(stored) == ["ca.crt", "site.pub"]


# The settled resync of this module's operator, and how long a test waits for it: the resync
# plus a pass on a loaded machine.
SETTLED_RESYNC = 15
SETTLED = SETTLED_RESYNC + 40


# Seconds after each operator start at which it is killed: from mid-start-up (about 2 s here)
# through its first reconciling passes (resync every 2 s).
KILL_AFTER = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0)


def round_status(kubectl: Kubectl, name: str = "notes-v1") -> dict:
    return kubectl.json("get", "traininground", name).get("status", {})


def run_progress(testbed: Testbed, kubectl: Kubectl, name: str = "notes-v1"):
    """The run's progress as the server app records it in S3 (None before it starts)."""
    key = round_status(kubectl, name).get("runKey")
    store = FederationStore(ObjectStore(testbed.s3_client(), testbed.s3().bucket,
                                        f"operator-flower/{kubectl.namespace}"))
    return store.read_progress(key) if key else None


def test_operator_killed_twenty_times_during_a_run_leaves_one_run_and_no_duplicates(
        testbed: Testbed, driven_operator: OperatorProcess, kubectl: Kubectl, flower_port: int,
        tiny_model_dir: Path, tmp_path: Path) -> None:
    with flower_hub(testbed, kubectl, flower_port, tiny_model_dir, tmp_path) as hub:
        # Rounds of some seconds (100 local steps), so that the kills fall through the run.
        local = {"maxSteps": 100, "batchSize": 4, "learningRate": 0.005, "sequenceLength": 64}
        kubectl.apply(yaml.safe_dump(training_round(rounds=3, local=local)))

        def status() -> dict:
            return round_status(kubectl)

        def point_of_the_run() -> str:
            # Where the run is, as the server app records it in S3: not as the status shows
            # it, which only a living operator updates.
            progress = run_progress(testbed, kubectl)
            return f"round {progress.round}" if progress else "not started"

        seen: list[str] = []
        most_jobs = 0
        kills = 0
        # Twenty kills; more (up to forty) while they have not yet fallen at three points of
        # the run.
        while kills < 20 or (len(set(seen)) < 3 and kills < 40):
            time.sleep(KILL_AFTER[kills % len(KILL_AFTER)])
            kills += 1
            driven_operator.kill()
            seen.append(point_of_the_run())
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


def test_two_operators_elect_one_leader_and_the_standby_finishes_the_run_when_it_dies(
        testbed: Testbed, crds: None, kubectl: Kubectl, flower_port: int, tiny_model_dir: Path,
        tmp_path: Path) -> None:
    """Two replicas with --leader-elect on one Lease: one reconciles, the other stands by and
    does nothing; the leader killed mid-run, the standby takes the Lease once it lapses and
    finishes the run: one Flower run, no duplicate Job, one adapter version."""
    env = {"POLLINATE_FLOWER_ADDRESS": f"127.0.0.1:{flower_port}",
           "POLLINATE_SETTLED_RESYNC_SECONDS": str(SETTLED_RESYNC)}
    args = ["--leader-elect", "--leader-elect-namespace", kubectl.namespace]
    first = OperatorProcess(testbed, tmp_path / "first.log", env, args)
    second = OperatorProcess(testbed, tmp_path / "second.log", env, args)
    first.start()
    try:
        eventually(lambda: "became the leader" in first.logs(), what="the first operator to lead")
        second.start()
        eventually(lambda: "standing by" in second.logs(), what="the second operator to stand by")
        with flower_hub(testbed, kubectl, flower_port, tiny_model_dir, tmp_path) as hub:
            local = {"maxSteps": 60, "batchSize": 4, "learningRate": 0.005, "sequenceLength": 64}
            kubectl.apply(yaml.safe_dump(training_round(rounds=2, local=local)))
            def status() -> dict:
                return round_status(kubectl)

            eventually(lambda: run_progress(testbed, kubectl), timeout=180, what="the run under way")
            most_jobs = len(kubectl.json("get", "jobs")["items"])
            killed = time.monotonic()
            first.kill()
            eventually(lambda: "became the leader" in second.logs(), timeout=90, interval=0.5,
                       what="the standby to take the Lease")
            print(f"the standby led {time.monotonic() - killed:.1f} s after the leader was killed")
            # Standing by, it did nothing: no line about any object before it led.
            before = second.logs().split("became the leader")[0]
            assert '"object"' not in before, before[-2000:]
            done = eventually(lambda: (st := status()).get("phase") in ("Succeeded", "Failed") and st,
                              timeout=600, what="the run finished by the new leader")
            assert done["phase"] == "Succeeded", done.get("conditions")
            most_jobs = max(most_jobs, len(kubectl.json("get", "jobs")["items"]))
            assert most_jobs <= 3
            with hub.server.control() as control:
                runs = [r for r in control.list_runs()
                        if r.override_config.get("training-round") == "notes-v1"
                        and r.override_config.get("namespace") == kubectl.namespace]
            assert [str(r.run_id) for r in runs] == [done["runId"]]
            assert done["adapterVersion"] == "v1"
            lease = kubectl.json("get", "lease", "pollinate-operator")["spec"]
            assert lease["leaseTransitions"] == 1 and lease["holderIdentity"]
    finally:
        first.stop()
        second.stop()
