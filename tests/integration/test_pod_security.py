"""The pods the operator creates, as the API server sees them: in a namespace that enforces the
restricted Pod Security Standard (the API server's own PodSecurity admission), the Flower
server's pod and every client Job's pod are admitted, and each runs as non-root, on a
read-only root filesystem, with no privilege escalation and every capability dropped."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pod_security import restricted_violations
from pollinate_testbed.testing import Kubectl, eventually

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
SITES = ("hospital-a", "hospital-b", "clinic-c")
SERVER_PODS = "pollinate.dev/federation=clinical-notes,app.kubernetes.io/component=server"
CLIENT_PODS = "pollinate.dev/federation=clinical-notes,app.kubernetes.io/component=site-client"


def refused_pod_creations(kubectl: Kubectl) -> list[str]:
    return [f"{e['involvedObject']['kind']}/{e['involvedObject']['name']}: {e['message']}"
            for e in kubectl.json("get", "events")["items"]
            if e["reason"] in ("FailedCreate", "FailedCreatePod") or "PodSecurity" in e.get("message", "")]


def test_operator_created_pods_are_admitted_under_the_restricted_pod_security_standard(
        operator, kubectl: Kubectl) -> None:
    kubectl.run("label", "namespace", kubectl.namespace, "--overwrite",
                "pod-security.kubernetes.io/enforce=restricted",
                "pod-security.kubernetes.io/enforce-version=latest")
    # The label is enforced here: a pod that asks for nothing is turned away.
    plain = kubectl.run("apply", "-f", "-", check=False, input=textwrap.dedent("""
        apiVersion: v1
        kind: Pod
        metadata: {name: plain}
        spec: {containers: [{name: c, image: busybox}]}
        """))
    assert plain.returncode != 0 and 'violates PodSecurity "restricted:latest"' in plain.stderr, plain.stderr

    s3 = kubectl.bed.s3()
    kubectl.run("create", "secret", "generic", "s3-credentials",
                f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}")
    federation = yaml.safe_load((ROOT / "examples/federation.yaml").read_text())
    # Simulated nodes run no Flower server: without authentication the Federation turns
    # Ready and the TrainingRound creates its client Jobs.
    federation["spec"]["server"]["nodeAuthentication"] = False
    kubectl.apply(yaml.safe_dump(federation))
    eventually(lambda: kubectl.json("get", "federation", "clinical-notes").get("status", {})
               .get("phase") == "Ready", timeout=90, what="Federation Ready")
    kubectl.apply((ROOT / "examples/traininground.yaml").read_text())

    def pods(selector: str, count: int) -> list[dict] | None:
        found = kubectl.json("get", "pods", "-l", selector)["items"]
        return found if len(found) >= count else None

    try:
        server = eventually(lambda: pods(SERVER_PODS, 1), timeout=90, what="the server's pod admitted")
        clients = eventually(lambda: pods(CLIENT_PODS, len(SITES)), timeout=90,
                             what="every client Job's pod admitted")
    except AssertionError as failure:
        raise AssertionError(f"{failure}\nrefused: {refused_pod_creations(kubectl)}") from failure
    assert sorted(p["metadata"]["labels"]["pollinate.dev/site"] for p in clients) == sorted(SITES)
    assert not refused_pod_creations(kubectl)

    # The check below tells a bare pod from a hardened one.
    assert len(restricted_violations({"metadata": {"name": "plain"},
                                      "spec": {"containers": [{"name": "c"}]}})) == 5
    problems = [p for pod in server + clients for p in restricted_violations(pod)]
    assert not problems, "\n".join(problems)
    for pod in server + clients:
        # No API credentials in a pod that never calls the API.
        assert pod["spec"]["automountServiceAccountToken"] is False, pod["metadata"]["name"]
        assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
