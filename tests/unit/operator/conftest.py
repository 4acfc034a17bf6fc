"""Specs built from the examples, as the API server would default them."""

from __future__ import annotations

import pytest
from example_objects import example
from pollinate_operator.api import FederationSpec, TrainingRoundSpec


@pytest.fixture
def federation_body() -> dict:
    body = example("federation")
    body["metadata"].update({"namespace": "research", "uid": "fed-uid", "generation": 1})
    return body


@pytest.fixture
def fed_spec(federation_body: dict) -> FederationSpec:
    return FederationSpec.model_validate(federation_body["spec"])


@pytest.fixture
def tr_spec() -> TrainingRoundSpec:
    return TrainingRoundSpec.model_validate(example("traininground")["spec"])
