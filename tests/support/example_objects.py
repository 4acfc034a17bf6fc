"""The repository's example Federation and TrainingRound, and the S3 Secret they name, as the
cluster tests apply them: the tests start from the files users start from (examples/)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # the unit tests read the examples without the testbed
    from pollinate_testbed.testing import Kubectl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example(kind: str) -> dict:
    """examples/<kind>.yaml as a dict, for a test to change before it applies it."""
    return yaml.safe_load((EXAMPLES / f"{kind}.yaml").read_text())


def example_federation(name: str = "clinical-notes", *, auth: bool = False,
                       sites: list[dict] | None = None, prefix: str | None = None) -> str:
    """The example Federation as YAML. Node authentication is off unless asked for: no Flower
    server really runs on simulated nodes, and with it on the Federation never turns Ready
    (the end-to-end tests cover authentication with real processes)."""
    body = example("federation")
    body["metadata"]["name"] = name
    body["spec"]["server"]["nodeAuthentication"] = auth
    if sites is not None:
        body["spec"]["sites"] = sites
    if prefix is not None:
        body["spec"]["storage"]["s3"]["prefix"] = prefix
    return yaml.safe_dump(body)


def example_round(name: str = "notes-v1", **spec_changes: object) -> str:
    """The example TrainingRound as YAML, with top-level spec fields replaced."""
    body = example("traininground")
    body["metadata"]["name"] = name
    body["spec"].update(spec_changes)
    return yaml.safe_dump(body)


def create_s3_secret(kubectl: Kubectl) -> None:
    """The `s3-credentials` Secret the examples name, holding the test S3 server's keys."""
    s3 = kubectl.bed.s3()
    kubectl.run("create", "secret", "generic", "s3-credentials",
                f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}")
