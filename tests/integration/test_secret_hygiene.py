"""Secrets stay in their Secrets: after the real operator has reconciled Federations (one with
node authentication, whose key registration keeps failing here, one without) and a
TrainingRound, and rotated a Federation's CA, no private key and no S3 secret key appears in
the operator's debug log, in any Event, or in any Federation's or TrainingRound's object
(status, annotations), nor inlined in the children it created (they name Secrets, never
copy them)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from example_objects import create_s3_secret, example_federation, example_round
from operator_process import OperatorProcess
from pollinate_testbed import Testbed
from pollinate_testbed.testing import Kubectl, eventually
from secret_search import leaks, secret_forms

pytestmark = pytest.mark.cluster

PRIVATE_KEYS = {"site.key", "ca.key", "tls.key"}


class VerboseOperator(OperatorProcess):
    """The operator at debug level: kopf then logs every patch and every handler's outcome,
    the likeliest place for a secret to slip out."""

    def start(self) -> None:
        env = {**os.environ, **self.bed.env(), "POLLINATE_RESYNC_SECONDS": "2",
               "POLLINATE_METRICS_PORT": "0", **self.extra_env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pollinate_operator", "--liveness", "", "--verbose"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()


@pytest.fixture
def verbose_operator(testbed: Testbed, crds: None, tmp_path: Path) -> Iterator[VerboseOperator]:
    op = VerboseOperator(testbed, tmp_path / "operator.log")
    op.start()
    yield op
    op.stop()


def phase(kubectl: Kubectl, kind: str, name: str) -> str | None:
    return kubectl.json("get", kind, name).get("status", {}).get("phase")


def secret_values(kubectl: Kubectl, federations: list[str]) -> dict[str, set[str]]:
    """Every private key of the Federations' Secrets, and the S3 secret key, by where it lives."""
    found: dict[str, set[str]] = {}
    for fed in federations:
        for secret in kubectl.json("get", "secrets", "-l", f"pollinate.dev/federation={fed}")["items"]:
            for key, data in secret["data"].items():
                if key in PRIVATE_KEYS:
                    found[f"{secret['metadata']['name']}/{key}"] = secret_forms(base64.b64decode(data))
    s3_key = kubectl.bed.s3().secret_key
    found["s3-credentials/AWS_SECRET_ACCESS_KEY"] = secret_forms(s3_key.encode())
    return found


def test_no_private_key_or_s3_secret_shows_in_logs_events_or_status(
        verbose_operator: VerboseOperator, kubectl: Kubectl) -> None:
    create_s3_secret(kubectl)
    # With authentication on, the operator keeps trying to register the site keys with a
    # Flower server that never comes up on simulated nodes: its error path runs every pass.
    kubectl.apply(example_federation("authenticated", auth=True, prefix="authenticated"))
    kubectl.apply(example_federation("clinical-notes", prefix="clinical-notes"))
    eventually(lambda: phase(kubectl, "federation", "clinical-notes") == "Ready", timeout=90,
               what="Federation Ready")
    kubectl.apply(example_round())
    eventually(lambda: len(kubectl.json("get", "jobs")["items"]) == 3, timeout=90, what="client Jobs")
    eventually(lambda: phase(kubectl, "traininground", "notes-v1"), timeout=60, what="TrainingRound status")
    old_keys = secret_values(kubectl, ["authenticated", "clinical-notes"])
    old_ca = kubectl.json("get", "secret", "clinical-notes-ca")["data"]["ca.key"]
    # A rotation: new CA and server keys go through the operator too.
    kubectl.run("patch", "federation", "clinical-notes", "--type=merge",
                "-p", '{"spec":{"server":{"tls":{"rotation":1}}}}')
    eventually(lambda: kubectl.json("get", "secret", "clinical-notes-ca")["data"]["ca.key"] != old_ca,
               timeout=60, what="rotated CA")
    eventually(lambda: phase(kubectl, "federation", "authenticated"), timeout=30,
               what="the authenticated Federation's status")

    values = {**old_keys, **{f"{k} (after rotation)": v for k, v in
                             secret_values(kubectl, ["authenticated", "clinical-notes"]).items()}}
    sites = ("hospital-a", "hospital-b", "clinic-c", "alice-laptop")
    for fed in ("authenticated", "clinical-notes"):
        expected = {f"{fed}-ca/ca.key", f"{fed}-server-tls/tls.key",
                    *(f"{fed}-site-{s}/site.key" for s in sites)}
        assert expected <= set(values), sorted(values)

    cluster = Kubectl(kubectl.bed)
    places = {
        "the operator's log": verbose_operator.logs(),
        "Events (all namespaces)": cluster.run("get", "events", "-A", "-o", "yaml").stdout,
        "Federations and TrainingRounds (all namespaces)":
            cluster.run("get", "federations,trainingrounds", "-A", "-o", "yaml").stdout,
        "the operator's children": kubectl.run(
            "get", "deployments,services,ingresses,networkpolicies,jobs,pods,configmaps",
            "-o", "yaml").stdout,
    }
    assert "clinical-notes" in places["the operator's log"]
    # Events about these objects exist (the failing key registration posts warnings).
    assert {"notes-v1", "clinical-notes", "authenticated"} & set(
        re.findall(r"name: ([\w-]+)", places["Events (all namespaces)"]))
    # The search itself finds what it looks for: each current value, where it belongs.
    in_secrets = kubectl.run("get", "secrets", "-o", "yaml").stdout
    current = {k: v for k, v in values.items() if "after rotation" in k}
    assert not [k for k, forms in current.items() if not any(f in in_secrets for f in forms)]
    found = leaks(values, places)
    assert not found, "secrets outside their Secrets:\n" + "\n".join(found)
