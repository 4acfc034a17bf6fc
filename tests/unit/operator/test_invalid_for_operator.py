"""The operator-side invalid corpus (tests/data/invalid-operator/): manifests the API server
accepts but the operator must refuse, each with the message fragment it must say. Here the
pure decision; tests/integration/test_operator.py applies the same files to a real cluster."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from pollinate_operator.api import FederationSpec, TrainingRoundSpec
from pollinate_operator.reconcile.traininground import TrainingRoundObserved, decide

CORPUS = sorted((Path(__file__).resolve().parents[2] / "data/invalid-operator").glob("*.yaml"))


def test_the_corpus_is_there() -> None:
    assert len(CORPUS) >= 4


@pytest.mark.parametrize("manifest", CORPUS, ids=[p.stem for p in CORPUS])
def test_operator_refuses_naming_the_field(manifest: Path, fed_spec: FederationSpec) -> None:
    expected = manifest.read_text().splitlines()[0].removeprefix("# expect: ")
    body = yaml.safe_load(manifest.read_text())
    spec = TrainingRoundSpec.model_validate(body["spec"])
    # The example Federation is the one in the namespace, as in the integration test.
    fed = fed_spec if spec.federation == "clinical-notes" else None
    d = decide(body["metadata"]["name"], spec, TrainingRoundObserved(
        now=dt.datetime(2026, 11, 22, tzinfo=dt.UTC), generation=1, federation=fed,
        federation_ready=True, jobs={}, run=None, server_reachable=True, progress=None))
    refusal = [c for c in d.status.conditions if expected in (c.message or "")]
    assert refusal, [c.message for c in d.status.conditions]
    assert refusal[0].reason in ("FederationNotFound", "InvalidSpec")
    assert not d.submit_run and not d.create_jobs
    assert any(expected in e.message and e.type == "Warning" for e in d.events)
