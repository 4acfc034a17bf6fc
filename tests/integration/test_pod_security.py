"""The pods the operator creates, as the API server sees them: in a namespace that enforces the
restricted Pod Security Standard (the API server's own PodSecurity admission), the Flower
server's pod and every client Job's pod are admitted, and each runs as non-root, on a
read-only root filesystem, with no privilege escalation and every capability dropped."""

from __future__ import annotations

import textwrap

import pytest
from example_objects import create_s3_secret, example_federation, example_round
from pod_security import restricted_violations
from pollinate_testbed.testing import Kubectl, eventually

pytestmark = pytest.mark.cluster

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

    create_s3_secret(kubectl)
    kubectl.apply(example_federation())
    eventually(lambda: kubectl.json("get", "federation", "clinical-notes").get("status", {})
               .get("phase") == "Ready", timeout=90, what="Federation Ready")
    kubectl.apply(example_round())

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
