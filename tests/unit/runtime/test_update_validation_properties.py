"""Properties of update validation over generated adapters: what is valid passes intact, and any
single defect is rejected with the right reason and the right tensor named."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pollinate_runtime.wire import (
    AdapterSpec,
    RejectReason,
    UpdateRejected,
    to_record,
    validate_update,
)

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def adapters(draw, max_layers: int = 3):
    """A global adapter, and an update of a site with rank <= the global rank."""
    layers = draw(st.integers(1, max_layers))
    global_rank = draw(st.integers(1, 8))
    site_rank = draw(st.integers(1, global_rank))
    modules = draw(st.lists(st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj"]),
                            min_size=1, max_size=3, unique=True))
    dims = {m: (draw(st.integers(1, 24)), draw(st.integers(1, 24))) for m in modules}
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    template, update = {}, {}
    for layer in range(layers):
        for module, (inp, out) in dims.items():
            base = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            template[f"{base}.lora_A.weight"] = np.zeros((global_rank, inp), np.float32)
            template[f"{base}.lora_B.weight"] = np.zeros((out, global_rank), np.float32)
            update[f"{base}.lora_A.weight"] = rng.standard_normal((site_rank, inp)).astype(np.float32)
            update[f"{base}.lora_B.weight"] = rng.standard_normal((out, site_rank)).astype(np.float32)
    return template, update


def reason_of(update, spec, **kwargs) -> UpdateRejected:
    kwargs.setdefault("max_norm", math.inf)
    try:
        validate_update(update, spec, **kwargs)
    except UpdateRejected as err:
        return err
    raise AssertionError("the update was accepted")


@PROPERTY_SETTINGS
@given(adapters(), st.sampled_from(["float16", "bfloat16", "float32"]))
def test_any_valid_update_is_accepted_in_every_transport_dtype(case, dtype):
    template, update = case
    spec = AdapterSpec.from_template(template)
    back = validate_update(to_record(update, dtype), spec, max_norm=math.inf)
    assert back.keys() == update.keys()
    for name, values in update.items():
        assert back[name].shape == values.shape
        np.testing.assert_allclose(back[name], values, rtol=2.0**-7, atol=2.0**-14)


@PROPERTY_SETTINGS
@given(adapters(), st.data(), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_any_single_non_finite_value_is_rejected_naming_its_tensor(case, data, bad):
    template, update = case
    name = data.draw(st.sampled_from(sorted(update)))
    flat_index = data.draw(st.integers(0, update[name].size - 1))
    update[name].reshape(-1)[flat_index] = bad
    err = reason_of(to_record(update, "float32"), AdapterSpec.from_template(template))
    assert err.reason is RejectReason.NON_FINITE
    assert err.tensor == name and name in err.message


@PROPERTY_SETTINGS
@given(adapters(), st.data(), st.integers(1, 5))
def test_any_wrong_non_rank_dimension_is_rejected_naming_its_tensor(case, data, grow):
    template, update = case
    name = data.draw(st.sampled_from(sorted(update)))
    values = update[name]
    if ".lora_A." in name:
        update[name] = np.zeros((values.shape[0], values.shape[1] + grow), np.float32)
    else:
        update[name] = np.zeros((values.shape[0] + grow, values.shape[1]), np.float32)
    err = reason_of(to_record(update), AdapterSpec.from_template(template))
    assert err.reason is RejectReason.WRONG_SHAPE
    assert err.tensor == name and str(update[name].shape) in err.message


@PROPERTY_SETTINGS
@given(adapters(), st.data())
def test_dropping_or_adding_any_tensor_is_rejected_naming_it(case, data):
    template, update = case
    name = data.draw(st.sampled_from(sorted(update)))
    spec = AdapterSpec.from_template(template)
    missing = dict(update)
    del missing[name]
    err = reason_of(to_record(missing), spec)
    assert err.reason is RejectReason.MISSING_TENSOR and err.tensor == name
    extra = dict(update)
    extra[name.replace("self_attn", "mlp")] = update[name]
    err = reason_of(to_record(extra), spec)
    assert err.reason is RejectReason.UNKNOWN_TENSOR
    assert err.tensor == name.replace("self_attn", "mlp")


@PROPERTY_SETTINGS
@given(adapters(), st.floats(0.05, 20.0))
def test_norm_bound_accepts_exactly_the_updates_within_it(case, ratio):
    template, update = case
    spec = AdapterSpec.from_template(template)
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))
    bound = norm * ratio
    if ratio > 1.001:
        validate_update(to_record(update, "float32"), spec, max_norm=bound)
    elif ratio < 0.999:
        assert reason_of(to_record(update, "float32"), spec, max_norm=bound).reason is (
            RejectReason.NORM_TOO_LARGE
        )


@PROPERTY_SETTINGS
@given(adapters(max_layers=1), st.integers(0, 1000), st.integers(0, 1000))
def test_only_a_reply_for_the_current_round_is_accepted(case, current, reported):
    template, update = case
    spec = AdapterSpec.from_template(template)
    record = to_record(update)
    if current == reported:
        validate_update(record, spec, max_norm=math.inf, expected_round=current,
                        reported_round=reported)
    else:
        err = reason_of(record, spec, expected_round=current, reported_round=reported)
        assert err.reason is RejectReason.STALE_ROUND
