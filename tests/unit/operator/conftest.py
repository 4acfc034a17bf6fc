"""Specs built from the examples, as the API server would default them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pollinate_operator.api import FederationSpec, TrainingRoundSpec

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def load(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


@pytest.fixture
def federation_body() -> dict:
    body = load("federation.yaml")
    body["metadata"].update({"namespace": "research", "uid": "fed-uid", "generation": 1})
    return body


@pytest.fixture
def fed_spec(federation_body: dict) -> FederationSpec:
    return FederationSpec.model_validate(federation_body["spec"])


@pytest.fixture
def tr_spec() -> TrainingRoundSpec:
    return TrainingRoundSpec.model_validate(load("traininground.yaml")["spec"])
