"""The typed models are a view of the CRDs, never a second definition: every field, type,
enum, default and required mark in `crds/` must match the model, and nothing more."""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
import yaml
from pollinate_operator.api import (
    FederationSpec,
    FederationStatus,
    TrainingRoundSpec,
    TrainingRoundStatus,
)
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

CRDS = Path(__file__).resolve().parents[3] / "crds"
PRIMITIVES = {"string": str, "integer": int, "number": float, "boolean": bool}


def crd_schema(file: str) -> dict:
    crd = yaml.safe_load((CRDS / file).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def unwrap_optional(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def check_type(annotation, schema: dict, path: str) -> None:
    annotation = unwrap_optional(annotation)
    origin = typing.get_origin(annotation)
    if "enum" in schema:
        assert origin is typing.Literal, f"{path}: CRD has an enum, model has {annotation}"
        assert set(typing.get_args(annotation)) == set(schema["enum"]), path
        return
    if schema.get("x-kubernetes-int-or-string"):
        return
    kind = schema.get("type")
    if kind == "object" and "properties" in schema:
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), (
            f"{path}: CRD object with properties needs a model, got {annotation}")
        check_model(annotation, schema, path)
    elif kind == "object":
        assert origin is dict, f"{path}: free-form object should be a dict, got {annotation}"
    elif kind == "array":
        assert origin is list, f"{path}: array should be a list, got {annotation}"
        check_type(typing.get_args(annotation)[0], schema["items"], f"{path}[]")
    else:
        expected = PRIMITIVES[kind]
        ok = annotation is expected or (expected is float and annotation is float)
        assert ok, f"{path}: CRD type {kind}, model {annotation}"


def check_model(model: type[BaseModel], schema: dict, path: str) -> None:
    props = schema.get("properties", {})
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    assert set(fields) == set(props), (
        f"{path}: only in CRD {sorted(set(props) - set(fields))}, "
        f"only in model {sorted(set(fields) - set(props))}")
    required = set(schema.get("required", []))
    for name, field in fields.items():
        prop, where = props[name], f"{path}.{name}"
        check_type(field.annotation, prop, where)
        has_default = field.default is not PydanticUndefined or field.default_factory is not None
        if name in required:
            assert not has_default, f"{where} is required in the CRD, so no default in the model"
        if "default" in prop:
            actual = field.default_factory() if field.default_factory else field.default
            if isinstance(actual, BaseModel):
                actual = actual.model_dump(by_alias=True, exclude_none=True)
                expected = model_of(field.annotation).model_validate(prop["default"]).model_dump(
                    by_alias=True, exclude_none=True)
            else:
                expected = prop["default"]
            assert actual == expected, f"{where}: CRD default {expected!r}, model {actual!r}"


def model_of(annotation) -> type[BaseModel]:
    return unwrap_optional(annotation)


@pytest.mark.parametrize(("file", "part", "model"), [
    ("federation.yaml", "spec", FederationSpec),
    ("federation.yaml", "status", FederationStatus),
    ("traininground.yaml", "spec", TrainingRoundSpec),
    ("traininground.yaml", "status", TrainingRoundStatus),
])
def test_model_matches_crd_schema(file: str, part: str, model: type[BaseModel]) -> None:
    check_model(model, crd_schema(file)["properties"][part], f"{file}:{part}")


def test_every_crd_field_has_a_description() -> None:
    missing = []

    def walk(schema: dict, path: str) -> None:
        for name, prop in schema.get("properties", {}).items():
            if path.count(".") >= 1 and "description" not in prop:
                missing.append(f"{path}.{name}")
            walk(prop, f"{path}.{name}")
        if "items" in schema:
            walk(schema["items"], f"{path}[]")

    for file in ("federation.yaml", "traininground.yaml"):
        schema = crd_schema(file)
        for part in ("spec", "status"):
            walk(schema["properties"][part], f"{file}.{part}")
    assert not missing, f"fields without a description (kubectl explain shows nothing): {missing}"
