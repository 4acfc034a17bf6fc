"""The API server itself enforces the Pollinate API: schemas, defaults, CEL rules, printer
columns and `kubectl explain` documentation, straight from `crds/`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from example_objects import example
from pollinate_testbed import Testbed
from pollinate_testbed.testing import Kubectl

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((ROOT / "tests/data/invalid").glob("*.yaml"))


def test_examples_are_accepted_as_they_are(crds: None, kubectl: Kubectl) -> None:
    for name in ("federation.yaml", "traininground.yaml"):
        kubectl.run("apply", "--dry-run=server", "-f", str(ROOT / "examples" / name))


def test_defaults_are_filled_in_by_the_api_server(crds: None, kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples/traininground.yaml"))
    spec = kubectl.json("get", "traininground", "notes-v1")["spec"]
    assert spec["pendingTimeoutSeconds"] == 300
    assert spec["transport"] == {"dtype": "float16", "maxUpdateNorm": 1000}
    assert spec["privacy"]["targetDelta"] == 1e-05
    assert spec["suspend"] is False


@pytest.mark.parametrize("manifest", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(crds: None, kubectl: Kubectl,
                                                      manifest: Path) -> None:
    expected = manifest.read_text().splitlines()[0].removeprefix("# expect: ")
    result = kubectl.run(
        "apply", "--dry-run=server", "-f", str(manifest), check=False)
    assert result.returncode != 0, f"{manifest.name} was accepted"
    assert expected in result.stderr, result.stderr


def test_federation_is_immutable_on_a_traininground(crds: None, kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples/traininground.yaml"))
    result = kubectl.run("patch", "traininground", "notes-v1", "--type=merge",
                   "-p", '{"spec":{"federation":"other"}}', check=False)
    assert result.returncode != 0
    assert "federation is immutable" in result.stderr


@pytest.mark.parametrize("patch", [
    {"rounds": 7}, {"strategy": {"name": "median"}}, {"local": {"maxSteps": 9}},
    {"sites": ["hospital-a", "hospital-b"]}, {"minSites": 3}, {"initialAdapterVersion": "v1"}])
def test_what_a_run_is_cannot_change_under_it_but_suspend_can(crds: None, kubectl: Kubectl,
                                                              patch: dict) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples/traininground.yaml"))
    (field,) = patch
    result = kubectl.run("patch", "traininground", "notes-v1", "--type=merge",
                         "-p", json.dumps({"spec": patch}), check=False)
    assert result.returncode != 0, f"spec.{field} changed"
    assert f"spec.{field} cannot change once the TrainingRound exists" in result.stderr, result.stderr
    kubectl.run("patch", "traininground", "notes-v1", "--type=merge", "-p", '{"spec":{"suspend":true}}')


def test_kubectl_explain_documents_the_api(crds: None, testbed: Testbed) -> None:
    k = Kubectl(testbed)
    out = k.run("explain", "federation.spec.sites").stdout
    assert "The sites of the federation" in out
    for field in ("nodeSelector", "external", "quantization", "data"):
        assert field in out
    out = k.run("explain", "traininground.spec.strategy").stdout
    assert "trimmedmean" in out


def test_printer_columns(crds: None, kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples/traininground.yaml"))
    header = kubectl.run("get", "trainingrounds").stdout.splitlines()[0].split()
    assert header[:5] == ["NAME", "FEDERATION", "PHASE", "ROUND", "SITES"]
    assert {"PERPLEXITY", "ADAPTER", "AGE"} <= set(header)
    fed = example("federation")
    kubectl.apply(yaml.safe_dump(fed))
    header = kubectl.run("get", "federations").stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "ENDPOINT", "SITES", "LATEST", "ADAPTER", "AGE"]
