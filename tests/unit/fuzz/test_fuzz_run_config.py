"""Flower's run config, as the server and client apps read it (`RunConfig.from_flower`): any
flat map either gives a RunConfig or a RunConfigError naming the key at fault, and a valid
config survives the trip through Flower's flat form."""

from __future__ import annotations

import dataclasses
import math

from hostile_json import json_values
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from pollinate_runtime.run_config import STRATEGIES, TRANSPORT_DTYPES, RunConfig, RunConfigError

FUZZ = settings.get_profile("pollinate-fuzz")
KEYS = sorted(RunConfig().to_flower())
# What Flower's run config can hold (TOML values, `--run-config` overrides), then anything.
flower_values = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "inf", "nan", "1e400", "true", "maybe", "fedavg", "float32",
                     "a=1,b=2", "a=x", "a", ",,", "a=1=2"]),
)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=12),
                              flower_values | json_values(max_leaves=4), max_size=8))
@example(config={"rounds": math.inf})  # int(inf)
@example(config={"lora-alpha": 10**400})  # float() of an int beyond float's range
@example(config={"site-ranks": "hospital-a"})
@example(config={"noise-multiplier": 1.0})
def test_any_run_config_parses_or_names_the_key_at_fault(config):
    try:
        RunConfig.from_flower(config)
    except RunConfigError as err:
        message = str(err)
        assert any(key in message for key in KEYS), message
        assert len(message) < 500 or any(len(repr(v)) > 200 for v in config.values()), message


names = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False)


def value_for(field: dataclasses.Field) -> st.SearchStrategy:
    """Values of the field's type that Flower's flat form can carry (names as Kubernetes has
    them: no ',' or '=')."""
    default = field.default
    if field.name == "strategy":
        return st.sampled_from(STRATEGIES)
    if field.name == "transport_dtype":
        return st.sampled_from(TRANSPORT_DTYPES)
    if field.name == "fraction_per_round":
        return st.floats(0, 1, exclude_min=True)
    if str(field.type).startswith("tuple"):
        return st.lists(names, max_size=3).map(tuple)
    if str(field.type).startswith("dict"):
        return st.dictionaries(names, st.integers(1, 64), max_size=3)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(1, 10**6)
    if isinstance(default, float):
        return finite
    return st.text(max_size=20)


@FUZZ
@given(st.fixed_dictionaries({}, optional={f.name: value_for(f)
                                           for f in dataclasses.fields(RunConfig)}))
def test_a_valid_run_config_survives_flowers_flat_form(values):
    try:
        config = RunConfig(**values)
    except RunConfigError:
        assume(False)
    assert RunConfig.from_flower(config.to_flower()) == config
