"""CR specs and stored statuses, as kopf hands them to the handlers, through the typed models:
any input either parses or raises pydantic's ValidationError naming every field at fault;
never a KeyError, TypeError or AttributeError out of a handler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from hostile_json import json_values, mutations
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pollinate_operator.api import (
    FederationSpec,
    FederationStatus,
    TrainingRoundSpec,
    TrainingRoundStatus,
)
from pollinate_operator.api.base import ApiModel
from pydantic import BaseModel, ValidationError

FUZZ = settings.get_profile("pollinate-fuzz")
EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
FEDERATION = yaml.safe_load((EXAMPLES / "federation.yaml").read_text())
TRAINING_ROUND = yaml.safe_load((EXAMPLES / "traininground.yaml").read_text())


def aliases(model: type[BaseModel], seen: set | None = None) -> set[str]:
    """Every camelCase field name of `model` and of the models inside it."""
    seen = set() if seen is None else seen
    if model in seen:
        return set()
    seen.add(model)
    names = set()
    for name, info in model.model_fields.items():
        names.add(info.alias or name)
        for inner in _models_in(info.annotation):
            names |= aliases(inner, seen)
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


FIELD_NAMES = st.sampled_from(sorted(aliases(FederationSpec) | aliases(TrainingRoundSpec)
                                     | aliases(FederationStatus) | aliases(TrainingRoundStatus)))


def body(spec: Any, status: Any = None) -> kopf.Body:
    return kopf.Body({"apiVersion": "pollinate.dev/v1alpha1", "metadata": {"name": "x"},
                      "spec": spec, "status": status})


def assert_parses_or_names_the_fields(parse, raw: Any) -> None:
    try:
        parse(raw)
    except ValidationError as err:
        message = str(err)
        for error in err.errors():
            assert error["loc"], f"an error without the field it is about: {error}"
            # pydantic writes the path dotted, quoting keys that hold a dot: `a.b`
            assert all(str(part) in message for part in error["loc"])


def parse_federation_spec(spec: Any) -> ApiModel:
    # As handlers/federation.py and handlers/traininground.py read it.
    return FederationSpec.model_validate(dict(body(spec)["spec"]))


def parse_training_round_spec(spec: Any) -> ApiModel:
    return TrainingRoundSpec.model_validate(dict(body(spec)["spec"]))


def test_the_examples_parse():
    assert parse_federation_spec(FEDERATION["spec"]).sites[0].name == "hospital-a"
    assert parse_training_round_spec(TRAINING_ROUND["spec"]).rounds == 3


@pytest.mark.parametrize("parse", [parse_federation_spec, parse_training_round_spec])
@FUZZ
@given(spec=st.dictionaries(FIELD_NAMES, json_values(FIELD_NAMES), max_size=8))
def test_any_spec_parses_or_names_the_fields_at_fault(parse, spec):
    assert_parses_or_names_the_fields(parse, spec)


@FUZZ
@given(spec=mutations(FEDERATION["spec"], FIELD_NAMES))
@example(spec={**FEDERATION["spec"], "sites": [{"name": None}]})
@example(spec={**FEDERATION["spec"], "adapter": {"rank": 1e400}})
def test_a_mutated_federation_parses_or_names_the_fields_at_fault(spec):
    assert_parses_or_names_the_fields(parse_federation_spec, spec)


@FUZZ
@given(spec=mutations(TRAINING_ROUND["spec"], FIELD_NAMES))
@example(spec={**TRAINING_ROUND["spec"], "rounds": "3x"})
@example(spec={**TRAINING_ROUND["spec"], "strategy": {"name": "fedsgd"}})
def test_a_mutated_training_round_parses_or_names_the_fields_at_fault(spec):
    assert_parses_or_names_the_fields(parse_training_round_spec, spec)


STATUSES = {
    "federation": (FederationStatus, {"phase": "Ready", "sites": [{"name": "hospital-a",
                                                                  "registered": True}]}),
    "training-round": (TrainingRoundStatus, {
        "phase": "Running", "round": 1, "runId": "7",
        "metrics": [{"round": 1, "perplexity": 12.5, "rejected": [{"site": "a", "reason": "b"}]}],
        "conditions": [{"type": "Ready", "status": "True"}], "kopf": {"progress": {}},
    }),
}


@pytest.mark.parametrize("kind", sorted(STATUSES))
@FUZZ
@given(data=st.data())
def test_a_stored_status_parses_or_names_the_fields_at_fault(kind, data):
    # What kopf passes as body["status"]: ours, kopf's own keys, and whatever a user patched.
    model, valid = STATUSES[kind]
    status = data.draw(mutations(valid, FIELD_NAMES) | st.dictionaries(
        FIELD_NAMES, json_values(FIELD_NAMES), max_size=6))
    assert_parses_or_names_the_fields(
        lambda raw: model.from_stored(dict(body({}, raw).get("status") or {})), status)
