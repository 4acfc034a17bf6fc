"""Adapters on the wire: transport dtypes, byte counts, and every reason an update is rejected."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from pollinate_runtime.wire import (
    LAYOUT,
    LAYOUT_STYPE,
    TENSORS,
    AdapterSpec,
    RejectReason,
    UpdateRejected,
    from_record,
    payload_bytes,
    to_record,
    validate_update,
)

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V_B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def rejection(update, spec, **kwargs) -> UpdateRejected:
    kwargs.setdefault("max_norm", math.inf)
    with pytest.raises(UpdateRejected) as caught:
        validate_update(update, spec, **kwargs)
    return caught.value


# ---- transport ----------------------------------------------------------------------------


def test_float32_record_round_trips_exactly(make_adapter):
    adapter = make_adapter()
    back = from_record(to_record(adapter, "float32"))
    assert back.keys() == adapter.keys()
    for name in adapter:
        np.testing.assert_array_equal(back[name], adapter[name])


def test_float16_is_the_default_transport_and_rounds_to_nearest_half(make_adapter):
    adapter = make_adapter()
    back = from_record(to_record(adapter))
    for name in adapter:
        assert back[name].dtype == np.float16
        np.testing.assert_array_equal(back[name], adapter[name].astype(np.float16))


def test_float16_payload_is_exactly_two_bytes_a_value_plus_a_small_layout(make_adapter):
    adapter = make_adapter(hidden=256, kv=128, rank=8)
    values = sum(v.size for v in adapter.values())
    half, full = to_record(adapter, "float16"), to_record(adapter, "float32")
    assert len(half[TENSORS].data) == 2 * values
    assert len(full[TENSORS].data) == 4 * values
    # Names and shapes, compressed: a few bytes a tensor, not a header per tensor.
    assert len(half[LAYOUT].data) < 20 * len(adapter)
    assert payload_bytes(half) == 2 * values + len(half[LAYOUT].data)


def test_a_whole_adapter_is_two_arrays_whatever_its_tensor_count(make_adapter):
    record = to_record(make_adapter(layers=6))
    assert sorted(record.keys()) == [LAYOUT, TENSORS]


def test_bfloat16_payload_is_two_bytes_a_value_and_decodes_to_float32(make_adapter):
    adapter = make_adapter()
    record = to_record(adapter, "bfloat16")
    assert len(record[TENSORS].data) == 2 * sum(v.size for v in adapter.values())
    back = from_record(record)
    for name, values in adapter.items():
        assert back[name].dtype == np.float32
        # bfloat16 keeps 8 significant bits: rounding's relative error is at most 2^-8.
        np.testing.assert_allclose(back[name], values, rtol=2.0**-8, atol=0)


def test_bfloat16_rounds_ties_to_even_like_torch():
    one_ulp = 2.0**-7  # bfloat16's spacing just above 1.0
    values = np.array(
        [1.0 + one_ulp / 2, 1.0 + 3 * one_ulp / 2, 1.0 + one_ulp / 2 + 2.0**-20, -2.5, 0.0],
        np.float32,
    )
    back = from_record(to_record({"x": values}, "bfloat16"))["x"]
    np.testing.assert_array_equal(back, [1.0, 1.0 + 2 * one_ulp, 1.0 + one_ulp, -2.5, 0.0])


def test_float16_encoding_refuses_values_beyond_its_range_and_names_the_tensor(make_adapter):
    adapter = make_adapter()
    adapter[Q_B][0, 0] = 1e6
    with pytest.raises(ValueError, match=rf"{Q_B}.*1e\+06.*float16"):
        to_record(adapter, "float16")
    to_record(adapter, "float32")  # the same adapter travels fine in float32


def test_unknown_transport_dtype_is_refused_with_the_choices(make_adapter):
    with pytest.raises(ValueError, match=r"float64.*float16, bfloat16, float32"):
        to_record(make_adapter(), "float64")


# ---- validation: accepted -----------------------------------------------------------------


def test_valid_float16_update_is_returned_in_float16(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    update = validate_update(to_record(make_adapter(seed=1)), spec, max_norm=100.0)
    assert {v.dtype for v in update.values()} == {np.dtype(np.float16)}


def test_update_of_a_lower_rank_site_is_accepted(make_adapter):
    spec = AdapterSpec.from_template(make_adapter(rank=8))
    update = validate_update(to_record(make_adapter(rank=3)), spec, max_norm=100.0)
    assert update[Q_A].shape == (3, 16)


def test_numpy_state_dict_is_validated_like_a_record(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    update = validate_update(make_adapter(seed=2), spec, max_norm=100.0)
    assert update.keys() == spec.tensors.keys()


# ---- validation: each reason --------------------------------------------------------------


def test_empty_update_is_rejected(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    err = rejection(ArrayRecord(), spec)
    assert err.reason is RejectReason.EMPTY
    assert "no tensors" in err.message and "8 tensors" in err.message


def test_update_with_unknown_tensor_is_rejected_and_names_it(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    update = make_adapter()
    update["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 16), np.float32)
    err = rejection(to_record(update), spec)
    assert err.reason is RejectReason.UNKNOWN_TENSOR
    assert err.tensor == "base_model.model.lm_head.lora_A.weight"
    assert "base_model.model.lm_head.lora_A.weight" in err.message


def test_update_missing_a_tensor_is_rejected_and_names_it(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    update = make_adapter()
    del update[V_B]
    err = rejection(to_record(update), spec)
    assert err.reason is RejectReason.MISSING_TENSOR
    assert V_B in err.message and err.tensor == V_B


def test_update_with_wrong_shape_is_rejected_naming_tensor_and_expected_shape(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    update = make_adapter()
    update[Q_A] = np.zeros((4, 17), np.float32)
    err = rejection(to_record(update), spec)
    assert err.reason is RejectReason.WRONG_SHAPE
    assert Q_A in err.message
    assert "(4, 17)" in err.message and "(r, 16) with 1 <= r <= 4" in err.message


def test_update_with_rank_above_the_global_rank_is_rejected(make_adapter):
    spec = AdapterSpec.from_template(make_adapter(rank=4))
    err = rejection(to_record(make_adapter(rank=8)), spec)
    assert err.reason is RejectReason.WRONG_SHAPE
    assert "1 <= r <= 4" in err.message


def test_update_whose_lora_pair_disagrees_on_rank_is_rejected(make_adapter):
    spec = AdapterSpec.from_template(make_adapter(rank=4))
    update = make_adapter(rank=4)
    update[Q_B] = update[Q_B][:, :2].copy()
    err = rejection(to_record(update), spec)
    assert err.reason is RejectReason.WRONG_SHAPE
    assert Q_B in err.message and Q_A in err.message and "equal ranks" in err.message


def repacked(record: ArrayRecord, *, dtype: str | None = None, stype: str | None = None,
             data: bytes | None = None, layout: bytes | None = None) -> ArrayRecord:
    """`record` with its values or layout Array replaced, as a hostile site could send it."""
    values = record[TENSORS]
    return ArrayRecord({
        LAYOUT: record[LAYOUT] if layout is None else Array(
            dtype="uint8", shape=(len(layout),), stype=LAYOUT_STYPE, data=layout),
        TENSORS: Array(dtype=dtype or values.dtype, shape=values.shape, stype=stype or values.stype,
                       data=values.data if data is None else data),
    })


@pytest.mark.parametrize("dtype", ["float64", "int32", "uint8"])
def test_update_in_a_dtype_other_than_float16_bfloat16_float32_is_rejected(make_adapter, dtype):
    spec = AdapterSpec.from_template(make_adapter())
    record = to_record(make_adapter(), "float32")
    err = rejection(repacked(record, dtype=dtype), spec)
    assert err.reason is RejectReason.WRONG_DTYPE
    assert dtype in err.message and "float16, bfloat16, float32" in err.message


def test_state_dict_in_float64_is_rejected_as_wrong_dtype(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    err = rejection(make_adapter(dtype=np.float64), spec)
    assert err.reason is RejectReason.WRONG_DTYPE and "float64" in err.message


def test_values_of_another_width_than_declared_are_rejected(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    record = to_record(make_adapter(), "float32")
    err = rejection(repacked(record, dtype="float16"), spec)  # 4-byte values declared as 2-byte
    assert err.reason is RejectReason.MALFORMED
    assert "bytes" in err.message and "float16" in err.message


def test_truncated_values_are_rejected_as_malformed(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    record = to_record(make_adapter(), "bfloat16")
    err = rejection(repacked(record, data=record[TENSORS].data[:-2]), spec)
    assert err.reason is RejectReason.MALFORMED
    assert "bfloat16" in err.message and "carry" in err.message


@pytest.mark.parametrize(("layout", "said"), [
    (b"not zlib at all", "not zlib"),
    (zlib.compress(b"{not json"), "not JSON"),
    (zlib.compress(b'{"a": 1}'), "expected a list"),
    (zlib.compress(b'[["x", [4, -1]]]'), "layout entry 0"),
    (zlib.compress(b'[["x", "4x16"]]'), "layout entry 0"),
    (zlib.compress(b'[[1, [4]]]'), "layout entry 0"),
    (zlib.compress(b'[["x", [true]]]'), "layout entry 0"),
    (zlib.compress(b'[["x", [1]], ["x", [1]]]'), "appears twice"),
    (zlib.compress(b"[]")[:-3], "truncated"),
    (zlib.compress(b"[" + b" " * (8 << 20) + b"]"), "inflates beyond"),
])
def test_a_malformed_layout_is_rejected_saying_what_is_wrong(make_adapter, layout, said):
    spec = AdapterSpec.from_template(make_adapter())
    err = rejection(repacked(to_record(make_adapter()), layout=layout), spec)
    assert err.reason is RejectReason.MALFORMED
    assert said in err.message


def test_a_record_that_is_not_a_packed_adapter_is_rejected(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    per_tensor = ArrayRecord({name: Array(values) for name, values in make_adapter().items()})
    err = rejection(per_tensor, spec)
    assert err.reason is RejectReason.MALFORMED and "expected exactly" in err.message
    err = rejection(repacked(to_record(make_adapter()), stype="numpy.ndarray"), spec)
    assert err.reason is RejectReason.MALFORMED and "stype" in err.message


def test_a_layout_describing_more_values_than_sent_is_rejected(make_adapter):
    record = to_record(make_adapter())
    layout = dict(json.loads(zlib.decompress(record[LAYOUT].data)))
    # One LoRA pair a rank larger, A and B alike: valid shapes for a rank-8 spec, but the
    # values carried are those of rank 4.
    layout[Q_A][0] += 1
    layout[Q_B][1] += 1
    spec = AdapterSpec.from_template(make_adapter(rank=8))
    forged = zlib.compress(json.dumps([[n, shape] for n, shape in layout.items()]).encode())
    err = rejection(repacked(record, layout=forged), spec)
    assert err.reason is RejectReason.MALFORMED
    assert "bytes" in err.message and "carry" in err.message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_update_with_non_finite_value_is_rejected_and_names_the_tensor(make_adapter, bad):
    spec = AdapterSpec.from_template(make_adapter())
    update = make_adapter()
    update[V_B][3, 1] = bad
    err = rejection(to_record(update, "float32"), spec)
    assert err.reason is RejectReason.NON_FINITE
    assert err.tensor == V_B
    assert V_B in err.message and "(3, 1)" in err.message


def test_update_with_nan_is_rejected_and_names_the_tensor(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    update = make_adapter(dtype=np.float16)
    update[Q_A][0, 5] = np.nan
    err = rejection(to_record(update), spec)
    assert err.reason is RejectReason.NON_FINITE and Q_A in err.message


def test_finite_float32_values_too_large_for_any_bound_are_rejected_by_norm(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    update = make_adapter()
    update[Q_A][:] = 3e38  # finite, but their squares overflow float32
    err = rejection(to_record(update, "float32"), spec, max_norm=1e30)
    assert err.reason is RejectReason.NORM_TOO_LARGE


def test_update_with_norm_above_bound_is_rejected_naming_the_largest_tensor(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    update = make_adapter()
    update[Q_B] *= 1000
    err = rejection(to_record(update), spec, max_norm=10.0)
    assert err.reason is RejectReason.NORM_TOO_LARGE
    assert "at most 10" in err.message and Q_B in err.message


def test_reply_for_another_round_is_rejected_as_a_replay(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    err = rejection(to_record(make_adapter()), spec, expected_round=5, reported_round=4)
    assert err.reason is RejectReason.STALE_ROUND
    assert "round 4" in err.message and "expected round 5" in err.message


def test_reply_without_a_round_number_is_rejected_when_one_is_expected(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    err = rejection(to_record(make_adapter()), spec, expected_round=2)
    assert err.reason is RejectReason.STALE_ROUND and "no round number" in err.message


def test_reply_for_the_current_round_is_accepted(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    validate_update(
        to_record(make_adapter()), spec, max_norm=100.0, expected_round=3, reported_round=3
    )


# ---- size ---------------------------------------------------------------------------------


def test_an_update_far_larger_than_its_layout_allows_is_rejected_before_decoding(make_adapter):
    spec = AdapterSpec.from_template(make_adapter())
    record = to_record(make_adapter())
    padding = b"\0" * (4 << 20)
    err = rejection(repacked(record, data=record[TENSORS].data + padding), spec)
    assert err.reason is RejectReason.OVERSIZED
    assert f"{payload_bytes(record) + len(padding)} bytes" in err.message
    assert f"at most {spec.max_update_bytes} bytes" in err.message


def test_the_size_limit_admits_every_honest_transport_dtype(make_adapter):
    adapter = make_adapter()
    spec = AdapterSpec.from_template(adapter)
    for dtype in ("float16", "bfloat16", "float32"):
        record = to_record(adapter, dtype)
        assert payload_bytes(record) <= spec.max_update_bytes
        validate_update(record, spec, max_norm=math.inf)
    assert spec.max_update_bytes < 4 * spec.num_parameters + (1 << 20)  # not unbounded
