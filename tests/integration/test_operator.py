"""The operator against the real control plane: children, placement on simulated GPU nodes,
pending timeouts, self-healing, restarts without duplicates, garbage collection."""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from example_objects import create_s3_secret, example_federation, example_round
from operator_process import OperatorProcess
from pollinate_operator.manifests import names
from pollinate_testbed.testing import Kubectl, eventually

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


def status(kubectl: Kubectl, kind: str, name: str) -> dict:
    return kubectl.json("get", kind, name).get("status", {})


def condition(kubectl: Kubectl, kind: str, name: str, type_: str) -> dict | None:
    return next((c for c in status(kubectl, kind, name).get("conditions", []) if c["type"] == type_), None)


def events(kubectl: Kubectl, name: str) -> list[dict]:
    return kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name}")["items"]


@pytest.fixture
def ready_federation(operator, kubectl: Kubectl) -> str:
    create_s3_secret(kubectl)
    kubectl.apply(example_federation())
    eventually(lambda: status(kubectl, "federation", "clinical-notes").get("phase") == "Ready",
               timeout=60, what="Federation Ready")
    return "clinical-notes"


def test_federation_creates_its_server_secrets_and_policy(operator, kubectl: Kubectl) -> None:
    create_s3_secret(kubectl)
    kubectl.apply(example_federation(auth=True))
    eventually(lambda: kubectl.run("get", "deployment", "clinical-notes-server", check=False).returncode == 0,
               what="server Deployment")
    dep = kubectl.json("get", "deployment", "clinical-notes-server")
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "Federation"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--enable-supernode-auth" in container["args"]
    svc = kubectl.json("get", "service", "clinical-notes-server")
    assert [p["port"] for p in svc["spec"]["ports"]] == [9092]
    ing = kubectl.json("get", "ingress", "clinical-notes-server")
    assert [p["path"] for p in ing["spec"]["rules"][0]["http"]["paths"]] == ["/v1/fleet"]
    assert ing["spec"]["rules"][0]["host"] == "fl.pollinate.localhost"
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"hosts": ["fl.pollinate.localhost"],
                                   "secretName": "clinical-notes-server-tls"}]
    policy = kubectl.json("get", "networkpolicy", "clinical-notes-server")["spec"]
    assert policy["podSelector"] == {"matchLabels": {
        "pollinate.dev/federation": "clinical-notes", "app.kubernetes.io/component": "server"}}
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 9092, "protocol": "TCP"}]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}},
        {"podSelector": {"matchLabels": {
            "pollinate.dev/federation": "clinical-notes", "app.kubernetes.io/component": "site-client"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pollinate-system"}},
         "podSelector": {"matchLabels": {"app.kubernetes.io/name": "pollinate-operator"}}},
    ]
    tls = kubectl.json("get", "secret", "clinical-notes-server-tls")
    assert set(tls["data"]) == {"ca.crt", "tls.crt", "tls.key"}
    # The operator's credential for the server's control API, mounted into the server pod.
    token = kubectl.json("get", "secret", "clinical-notes-control-token")
    assert set(token["data"]) == {"token"}
    assert token["metadata"]["ownerReferences"][0]["kind"] == "Federation"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["control"]["secret"]["secretName"] == "clinical-notes-control-token"
    for site in ("hospital-a", "hospital-b", "clinic-c", "alice-laptop"):
        secret = kubectl.json("get", "secret", f"clinical-notes-site-{site}")
        assert set(secret["data"]) == {"site.key", "site.pub", "ca.crt"}
    st = eventually(lambda: status(kubectl, "federation", "clinical-notes").get("sitesSummary") and
                    status(kubectl, "federation", "clinical-notes"), what="Federation status")
    assert st["endpoint"] == "fl.pollinate.localhost:443"
    assert st["internalEndpoint"] == f"clinical-notes-server.{kubectl.namespace}.svc:9092"
    # No Flower server really runs on a simulated node, so no key can be registered yet.
    assert st["phase"] == "Pending"
    assert st["sitesSummary"] == "0/4"


def secret_data(kubectl: Kubectl, name: str) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in kubectl.json("get", "secret", name)["data"].items()}


def test_the_server_certificate_is_renewed_before_expiry_and_a_rotation_overlaps_the_cas(
        operator, kubectl: Kubectl) -> None:
    """Certificates of three minutes, renewed 150 s before expiry (30 s after issue); a CA
    rotation with a 40 s overlap. Sites' bundles carry old and new CA during the overlap while
    the server keeps a certificate of the old one, then the server moves to the new CA."""
    from pollinate_operator import pki

    create_s3_secret(kubectl)
    body = yaml.safe_load(example_federation())
    body["spec"]["server"]["tls"] = {"certificateDuration": "3m", "renewBefore": "150s",
                                     "caOverlap": "40s"}
    kubectl.apply(yaml.safe_dump(body))
    tls_name, ca_name, site = ("clinical-notes-server-tls", "clinical-notes-ca",
                               "clinical-notes-site-hospital-a")
    first = eventually(lambda: kubectl.run("get", "secret", tls_name, check=False).returncode == 0
                       and secret_data(kubectl, tls_name)["tls.crt"], what="server certificate")
    issued = pki.not_after(first)
    assert dt.timedelta(minutes=2) < issued - dt.datetime.now(dt.UTC) <= dt.timedelta(minutes=3)

    # Renewed once 150 s of its three minutes are left, and the server restarts with it.
    second = eventually(lambda: (c := secret_data(kubectl, tls_name)["tls.crt"]) != first and c,
                        timeout=120, interval=1.0, what="the renewed certificate")
    assert pki.not_after(second) > issued
    def rolled() -> bool:
        template = kubectl.json("get", "deployment", "clinical-notes-server")["spec"]["template"]
        return template["metadata"]["annotations"][f"{names.GROUP}/server-certificate"] in (
            pki.fingerprint(second), pki.fingerprint(secret_data(kubectl, tls_name)["tls.crt"]))
    eventually(rolled, what="the server Deployment to carry the renewed certificate")
    expires = status(kubectl, "federation", "clinical-notes")["serverCertificate"]["notAfter"]
    assert dt.datetime.fromisoformat(expires) >= pki.not_after(second)

    # A rotation: the new CA joins the old in every bundle; the server keeps the old CA's.
    old_ca = secret_data(kubectl, ca_name)["ca.crt"]
    kubectl.run("patch", "federation", "clinical-notes", "--type=merge",
                "-p", json.dumps({"spec": {"server": {"tls": {"rotation": 1}}}}))
    def rotated() -> dict[str, bytes] | None:
        data = secret_data(kubectl, ca_name)
        return data if "previous-ca.crt" in data else None
    ca = eventually(rotated, timeout=60, what="the rotated CA with the previous one kept")
    assert ca["previous-ca.crt"] == old_ca and ca["ca.crt"] != old_ca
    bundle = eventually(lambda: (b := secret_data(kubectl, site)["ca.crt"]).count(b"BEGIN CERTIFICATE") == 2
                        and b, what="the site's bundle with both CAs")
    assert ca["ca.crt"] in bundle and old_ca in bundle
    assert pki.issued_by(secret_data(kubectl, tls_name)["tls.crt"], old_ca)
    until = status(kubectl, "federation", "clinical-notes")["serverCertificate"]["previousCaTrustedUntil"]
    assert dt.datetime.fromisoformat(until) > dt.datetime.now(dt.UTC)

    # After the overlap: the server's certificate is the new CA's and bundles hold only it.
    def moved() -> bool:
        return (pki.issued_by(secret_data(kubectl, tls_name)["tls.crt"], ca["ca.crt"])
                and secret_data(kubectl, site)["ca.crt"].strip() == ca["ca.crt"].strip()
                and "previous-ca.crt" not in secret_data(kubectl, ca_name))
    eventually(moved, timeout=120, interval=1.0, what="the server on the new CA, the old one dropped")
    assert secret_data(kubectl, tls_name)["ca.crt"].strip() == ca["ca.crt"].strip()


def test_a_federation_never_takes_over_objects_it_did_not_create(operator, kubectl: Kubectl) -> None:
    # A CA Secret and a Service already there under the names the Federation would use: a CA
    # someone planted must never become the Federation's, and a user's Service must not
    # become the operator's (nor be garbage-collected with the Federation).
    create_s3_secret(kubectl)
    kubectl.run("create", "secret", "generic", "clinical-notes-ca", "--from-literal=ca.crt=planted",
                "--from-literal=ca.key=planted")
    kubectl.run("create", "service", "clusterip", "clinical-notes-server", "--tcp=80:80")
    planted = kubectl.json("get", "secret", "clinical-notes-ca")
    kubectl.apply(example_federation())

    def conflict() -> dict | None:
        ready = condition(kubectl, "federation", "clinical-notes", "Ready")
        return ready if ready and ready["reason"] == "NameConflict" else None

    ready = eventually(conflict, timeout=60, what="the Federation reporting the taken name")
    assert ready["status"] == "False"
    assert "Secret " + kubectl.namespace + "/clinical-notes-ca already exists" in ready["message"]
    assert "its controller: none" in ready["message"]
    assert status(kubectl, "federation", "clinical-notes")["phase"] == "Pending"
    assert "NameConflict" in {e["reason"] for e in events(kubectl, "clinical-notes")}
    after = kubectl.json("get", "secret", "clinical-notes-ca")
    assert after["data"] == planted["data"] and not after["metadata"].get("ownerReferences")
    assert not kubectl.json("get", "deployments")["items"], "nothing is applied while a name is taken"

    # The Secret removed, the Service is next in the way; removed too, the Federation is Ready.
    kubectl.run("delete", "secret", "clinical-notes-ca")
    eventually(lambda: (c := conflict()) and "Service " in c["message"], timeout=60,
               what="the Service named as the next taken name")
    assert not kubectl.json("get", "service", "clinical-notes-server")["metadata"].get("ownerReferences")
    kubectl.run("delete", "service", "clinical-notes-server")
    eventually(lambda: status(kubectl, "federation", "clinical-notes").get("phase") == "Ready",
               timeout=90, what="Federation Ready once the names are free")


def test_client_jobs_land_on_their_sites_gpu_nodes(ready_federation: str, kubectl: Kubectl) -> None:
    kubectl.apply(example_round())
    for site in ("hospital-a", "hospital-b", "clinic-c"):
        def placed(site=site) -> str | None:
            pods = kubectl.json("get", "pods", "-l", f"pollinate.dev/site={site}")["items"]
            return pods[0]["spec"].get("nodeName") if pods else None
        node = eventually(placed, what=f"{site} client pod scheduled")
        assert node.startswith(f"gpu-{site}-")
    job = kubectl.json("get", "job", "notes-v1-hospital-a")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "TrainingRound"
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    st = eventually(lambda: status(kubectl, "traininground", "notes-v1").get("phase") == "Running"
                    and status(kubectl, "traininground", "notes-v1"), what="TrainingRound Running")
    assert st["progress"] == "0/3"
    out = kubectl.run("get", "trainingrounds").stdout
    assert "clinical-notes" in out and "Running" in out


def test_names_up_to_the_kubernetes_limit_derive_distinct_children(operator, kubectl: Kubectl) -> None:
    # Before derived names were fitted with a hash, two TrainingRounds of 60 characters gave
    # every site the same Job, and a name near 63 failed the operator's pass with a 422.
    create_s3_secret(kubectl)
    federation = ("clinical-notes-" * 17)[:250]
    kubectl.apply(example_federation(federation))
    eventually(lambda: status(kubectl, "federation", federation).get("phase") == "Ready",
               timeout=90, what="a Federation with a 250-character name Ready")
    shared = ("notes-" * 10)[:56]
    rounds = [f"{shared}-one", f"{shared}-two", ("notes-v" * 36)[:249] + "1"]
    assert [len(r) for r in rounds] == [60, 60, 250]
    for name in rounds:
        kubectl.apply(example_round(name, federation=federation))

    def all_jobs() -> list[dict] | None:
        jobs = kubectl.json("get", "jobs")["items"]
        return jobs if len(jobs) == 9 else None

    jobs = eventually(all_jobs, timeout=120, what="three client Jobs for each of three rounds")
    assert len({j["metadata"]["name"] for j in jobs}) == 9
    owners = sorted(j["metadata"]["ownerReferences"][0]["name"] for j in jobs)
    assert owners == sorted(rounds * 3)
    for name in rounds:
        eventually(lambda n=name: status(kubectl, "traininground", n).get("phase") == "Running",
                   timeout=60, what=f"TrainingRound of {len(name)} characters Running")
        for site in ("hospital-a", "hospital-b", "clinic-c"):
            selector = f"{names.training_round_selector(name)},{names.SITE_LABEL}={site}"
            assert kubectl.json("get", "pods", "-l", selector)["items"], (name, site)


def test_site_without_a_free_gpu_is_reported_after_the_pending_timeout(
        ready_federation: str, kubectl: Kubectl) -> None:
    for i in range(2):  # take both of clinic-c's GPUs
        kubectl.apply(textwrap.dedent(f"""
            apiVersion: v1
            kind: Pod
            metadata: {{name: holder-{i}}}
            spec:
              nodeSelector: {{pollinate.dev/site: clinic-c}}
              containers: [{{name: c, image: x, resources: {{limits: {{nvidia.com/gpu: 1}}}}}}]
            """))
    eventually(lambda: all(kubectl.json("get", "pod", f"holder-{i}")["status"].get("phase") == "Running"
                           for i in range(2)), what="GPU holders running")
    kubectl.apply(example_round(pendingTimeoutSeconds=10))
    cond = eventually(lambda: (c := condition(kubectl, "traininground", "notes-v1", "SitesPending"))
                      and c["status"] == "True" and c, timeout=60, what="SitesPending condition")
    assert "clinic-c" in cond["message"] and "nvidia.com/gpu" in cond["message"]
    st = status(kubectl, "traininground", "notes-v1")
    assert st["phase"] == "Running"  # minSites 2 still holds
    assert {s["name"]: s["state"] for s in st["sites"]}["clinic-c"] == "Unschedulable"
    reasons = [e["reason"] for e in events(kubectl, "notes-v1")]
    assert "SiteUnschedulable" in reasons


def test_deleted_server_deployment_comes_back(ready_federation: str, kubectl: Kubectl) -> None:
    uid = kubectl.json("get", "deployment", "clinical-notes-server")["metadata"]["uid"]
    kubectl.run("delete", "deployment", "clinical-notes-server")
    eventually(lambda: (r := kubectl.run("get", "deployment", "clinical-notes-server", "-o", "json",
                                         check=False)).returncode == 0
               and json.loads(r.stdout)["metadata"]["uid"] != uid, what="Deployment recreated")


def test_operator_restarts_mid_reconcile_without_duplicating_children(
        operator, kubectl: Kubectl) -> None:
    create_s3_secret(kubectl)
    kubectl.apply(example_federation())
    kubectl.apply(example_round())
    for _ in range(3):  # kill it at whatever point it is in, three times
        operator.kill()
        operator.start()
        eventually(lambda: kubectl.run("get", "deployment", "clinical-notes-server", check=False)
                   .returncode == 0, timeout=120, what="server Deployment")
    eventually(lambda: len(kubectl.json("get", "jobs")["items"]) == 3, timeout=180, what="three client Jobs")
    assert len(kubectl.json("get", "deployments")["items"]) == 1
    secrets = kubectl.json("get", "secrets", "-l", "pollinate.dev/federation=clinical-notes")["items"]
    sites = ("hospital-a", "hospital-b", "clinic-c", "alice-laptop")
    assert sorted(s["metadata"]["name"] for s in secrets) == sorted([
        "clinical-notes-ca", "clinical-notes-server-tls", "clinical-notes-control-token",
        *(f"clinical-notes-site-{s}" for s in sites)])
    assert len(kubectl.json("get", "jobs")["items"]) == 3


def test_deleting_a_federation_collects_its_children_and_fails_its_running_round(
        ready_federation: str, kubectl: Kubectl) -> None:
    kubectl.apply(example_round())
    eventually(lambda: len(kubectl.json("get", "jobs")["items"]) == 3, what="notes-v1's client Jobs")
    eventually(lambda: status(kubectl, "traininground", "notes-v1").get("phase") == "Running",
               what="notes-v1 Running")
    kubectl.run("delete", "federation", "clinical-notes", "--wait=true", "--timeout=60s")
    # The round cannot go on without its server and keys: it fails naming the Federation, and
    # its client Jobs (owned by the round, not the Federation) go, freeing their GPUs.
    failed = eventually(lambda: (st := status(kubectl, "traininground", "notes-v1")).get("phase")
                        == "Failed" and st, timeout=60, what="notes-v1 Failed")
    reason = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert reason["reason"] == "FederationDeleted" and "'clinical-notes' was deleted" in reason["message"]
    eventually(lambda: not kubectl.json("get", "jobs")["items"], timeout=60, what="client Jobs deleted")
    for kind in ("deployment", "service", "ingress", "networkpolicy"):
        eventually(lambda kind=kind: kubectl.run("get", kind, "clinical-notes-server", check=False)
                   .returncode != 0, what=f"{kind} collected")
    eventually(lambda: not kubectl.json("get", "secrets", "-l", "pollinate.dev/federation")["items"],
               what="secrets collected")


INVALID_FOR_OPERATOR = sorted((ROOT / "tests/data/invalid-operator").glob("*.yaml"))


@pytest.mark.parametrize("manifest", INVALID_FOR_OPERATOR, ids=[p.stem for p in INVALID_FOR_OPERATOR])
def test_operator_refuses_what_the_api_server_cannot_check_naming_the_field(
        operator, kubectl: Kubectl, manifest: Path) -> None:
    # Rules that span two resources: the API server accepts the TrainingRound, the operator
    # says what is wrong in a condition and a Warning Event, and starts nothing.
    expected = manifest.read_text().splitlines()[0].removeprefix("# expect: ")
    name = yaml.safe_load(manifest.read_text())["metadata"]["name"]
    create_s3_secret(kubectl)
    kubectl.apply(example_federation())
    kubectl.run("apply", "-f", str(manifest))

    def refusal() -> dict | None:
        return next((c for c in status(kubectl, "traininground", name).get("conditions", [])
                     if expected in c.get("message", "")), None)

    cond = eventually(refusal, timeout=60, what=f"a condition saying {expected!r}")
    assert cond["reason"] in ("FederationNotFound", "InvalidSpec")
    st = status(kubectl, "traininground", name)
    # A missing Federation may still be created: the round waits; anything else fails.
    assert st["phase"] == ("Pending" if cond["reason"] == "FederationNotFound" else "Failed")
    assert any(e["type"] == "Warning" and expected in e["message"] for e in events(kubectl, name))
    assert not kubectl.json("get", "jobs", "-l", f"pollinate.dev/traininground={name}")["items"]
    assert "runId" not in st


def test_site_removed_from_federation_loses_its_key(ready_federation: str, kubectl: Kubectl) -> None:
    body = yaml.safe_load(example_federation())
    body["spec"]["sites"] = [s for s in copy.deepcopy(body["spec"]["sites"]) if s["name"] != "alice-laptop"]
    kubectl.apply(yaml.safe_dump(body))
    eventually(lambda: kubectl.run("get", "secret", "clinical-notes-site-alice-laptop", check=False)
               .returncode != 0, what="alice-laptop key removed")


def test_operator_logs_never_contain_secrets(operator, ready_federation: str, kubectl: Kubectl) -> None:
    secret = kubectl.json("get", "secret", "clinical-notes-site-hospital-a")["data"]["site.key"]
    key = base64.b64decode(secret).decode()
    body = key.splitlines()[1]
    logs = operator.logs()
    assert body not in logs
    assert kubectl.bed.s3().secret_key not in logs


def test_a_rotation_without_overlap_cuts_over_to_the_new_ca_at_once(ready_federation: str,
                                                                     kubectl: Kubectl) -> None:
    """caOverlap 0s (a compromised CA): the new CA replaces the old in every bundle and the
    server restarts with its certificate at once. (With an overlap: the certificate test above.)"""
    old_ca = kubectl.json("get", "secret", "clinical-notes-ca")["data"]["ca.crt"]
    old_cert = kubectl.json("get", "deployment", "clinical-notes-server")["spec"]["template"][
        "metadata"]["annotations"]["pollinate.dev/server-certificate"]
    kubectl.run("patch", "federation", "clinical-notes", "--type=merge",
                "-p", '{"spec":{"server":{"tls":{"rotation":1,"caOverlap":"0s"}}}}')
    eventually(lambda: kubectl.json("get", "secret", "clinical-notes-ca")["data"]["ca.crt"] != old_ca,
               what="new CA")
    eventually(lambda: kubectl.json("get", "deployment", "clinical-notes-server")["spec"]["template"][
        "metadata"]["annotations"]["pollinate.dev/server-certificate"] != old_cert,
               what="server restarted with the new certificate")
    new_ca = kubectl.json("get", "secret", "clinical-notes-ca")["data"]["ca.crt"]
    # Every site's identity carries the new CA, its key unchanged.
    eventually(lambda: kubectl.json("get", "secret", "clinical-notes-site-hospital-a")["data"]["ca.crt"]
               == new_ca, what="site secret has the new CA")


def test_suspend_stops_client_jobs_and_resume_brings_them_back(ready_federation: str,
                                                              kubectl: Kubectl) -> None:
    kubectl.apply(example_round())
    eventually(lambda: len(kubectl.json("get", "jobs")["items"]) == 3, timeout=120, what="client Jobs")
    kubectl.run("patch", "traininground", "notes-v1", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    eventually(lambda: status(kubectl, "traininground", "notes-v1").get("phase") == "Suspended",
               what="Suspended")
    eventually(lambda: not kubectl.json("get", "jobs")["items"], what="client Jobs deleted")
    kubectl.run("patch", "traininground", "notes-v1", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    eventually(lambda: status(kubectl, "traininground", "notes-v1").get("phase") == "Running",
               what="Running again")
    eventually(lambda: len(kubectl.json("get", "jobs")["items"]) == 3, timeout=120, what="Jobs recreated")
    reasons = [e["reason"] for e in events(kubectl, "notes-v1")]
    assert "Suspended" in reasons and "Resumed" in reasons


def test_operator_still_sees_changes_after_the_api_server_restarts(
        ready_federation: str, kubectl: Kubectl) -> None:
    # kopf's watch streams break with the API server; a watch that silently never resumes
    # would go unnoticed by the periodic passes, which read kopf's cached copy of an object.
    kubectl.bed.restart_apiserver(downtime=5)
    body = yaml.safe_load(example_federation())
    body["spec"]["sites"] = [s for s in body["spec"]["sites"] if s["name"] != "alice-laptop"]
    kubectl.apply(yaml.safe_dump(body))  # a change to an object the operator already knew
    eventually(lambda: kubectl.run("get", "secret", "clinical-notes-site-alice-laptop", check=False)
               .returncode != 0, timeout=120, what="a spec change handled after the restart")
    kubectl.apply(example_federation("second-federation"))  # an object it never saw
    eventually(lambda: kubectl.run("get", "deployment", "second-federation-server", check=False)
               .returncode == 0, timeout=120, what="a new Federation reconciled after the restart")


def test_a_deleted_child_wakes_its_owner_without_waiting_for_the_resync(
        ready_federation: str, operator, kubectl: Kubectl, tmp_path: Path) -> None:
    # With the periodic pass an hour away, only the watch on the owner's children can bring a
    # deleted server Deployment back: a broken wake-up fails this test instead of hiding
    # behind the timer.
    operator.stop()
    slow = OperatorProcess(kubectl.bed, tmp_path / "slow-operator.log", {"POLLINATE_RESYNC_SECONDS": "3600"})
    slow.start()
    try:
        time.sleep(15)  # started, and its resume pass over the existing objects done
        # The Deployment's status wakes its Federation too; a Service is not re-sent on every
        # pass (kube.AppliedCache), so only its own watch can get it applied again; a site's
        # key Secret deleted (a key rotation) is replaced by a new key at once.
        for kind, name in (("deployment", "clinical-notes-server"), ("service", "clinical-notes-server"),
                           ("secret", "clinical-notes-site-hospital-a")):
            before = kubectl.json("get", kind, name)
            kubectl.run("delete", kind, name)
            after = eventually(lambda k=kind, n=name, old=before["metadata"]["uid"]: (r := kubectl.run(
                "get", k, n, "-o", "json", check=False)).returncode == 0
                and (new := json.loads(r.stdout))["metadata"]["uid"] != old and new,
                timeout=120, what=f"{kind} {name} recreated by a wake-up (resync an hour away)")
            if kind == "secret":
                assert after["data"]["site.pub"] != before["data"]["site.pub"], "the key was not rotated"
    finally:
        slow.stop()
        operator.start()


def test_a_second_operator_neither_freezes_the_first_nor_duplicates_children(
        operator, kubectl: Kubectl, tmp_path: Path) -> None:
    """One replica is the supported mode, but a second one happens (a rolling update's old pod,
    a developer's laptop). kopf pauses every operator that sees a peer of the same priority
    (operators.md); ours pick random priorities and do not require the peering objects, so
    neither pauses, and their server-side applies of the same children converge."""
    second = OperatorProcess(kubectl.bed, tmp_path / "second-operator.log")
    second.start()
    try:
        create_s3_secret(kubectl)
        kubectl.apply(example_federation())
        kubectl.apply(example_round())
        eventually(lambda: status(kubectl, "federation", "clinical-notes").get("phase") == "Ready",
                   timeout=120, what="Federation Ready with two operators")
        eventually(lambda: len(kubectl.json("get", "jobs")["items"]) == 3, timeout=180,
                   what="three client Jobs with two operators")
        assert len(kubectl.json("get", "deployments")["items"]) == 1
        assert len(kubectl.json("get", "jobs")["items"]) == 3
        secrets = kubectl.json("get", "secrets", "-l", "pollinate.dev/federation=clinical-notes")["items"]
        assert len(secrets) == len({s["metadata"]["name"] for s in secrets}) == 7  # CA, TLS, token, 4 sites
    finally:
        second.stop()
    for log in (operator.logs(), second.logs()):
        assert "Pausing" not in log
    # The first one still reconciles on its own afterwards.
    kubectl.run("delete", "deployment", "clinical-notes-server")
    eventually(lambda: kubectl.run("get", "deployment", "clinical-notes-server", check=False).returncode == 0,
               timeout=120, what="server Deployment recreated by the remaining operator")
