"""Site updates as they arrive (`wire.validate_update` on a packed ArrayRecord): any layout and
any values either validate into tensors of the spec or are an UpdateRejected with a reason, and
never anything else (no zlib, JSON or numpy error escapes, no huge allocation)."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
from flwr.app import Array, ArrayRecord
from hostile_json import json_values
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pollinate_runtime.wire import (
    LAYOUT,
    LAYOUT_STYPE,
    PACKED_STYPE,
    TENSORS,
    AdapterSpec,
    UpdateRejected,
    to_record,
    validate_update,
)

FUZZ = settings.get_profile("pollinate-fuzz")
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SPEC = AdapterSpec.from_template({A: np.zeros((4, 8), np.float32), B: np.zeros((8, 4), np.float32)})

shapes = st.lists(st.integers(-2, 40), max_size=3)
names = st.sampled_from([A, B, "x", ""]) | st.text(max_size=10)
layouts = (st.lists(st.tuples(names, shapes).map(list), max_size=4).map(json.dumps).map(str.encode)
           | json_values(max_leaves=6).map(json.dumps).map(str.encode)
           | st.binary(max_size=64))


def packed(layout: bytes, data: bytes, dtype: str, compress: bool) -> ArrayRecord:
    body = zlib.compress(layout) if compress else layout
    return ArrayRecord({
        LAYOUT: Array(dtype="uint8", shape=(len(body),), stype=LAYOUT_STYPE, data=body),
        TENSORS: Array(dtype=dtype, shape=(len(data) // 2,), stype=PACKED_STYPE, data=data),
    })


def check(record: ArrayRecord) -> None:
    try:
        state = validate_update(record, SPEC, max_norm=math.inf)
    except UpdateRejected as err:
        assert err.reason and err.message
        return
    assert state.keys() == SPEC.tensors.keys()
    for name, values in state.items():
        assert SPEC.tensors[name].accepts(tuple(values.shape))
        assert np.isfinite(values).all()


@FUZZ
@given(layout=layouts, data=st.binary(max_size=256),
       dtype=st.sampled_from(["float16", "float32", "bfloat16", "float64", "int8", ""]),
       compress=st.booleans())
@example(layout=json.dumps([[A, [4, 8]], [B, [8, 4]]]).encode(), data=b"\0" * 128, dtype="float16",
         compress=True)
@example(layout=json.dumps([[A, [2, 8]], [B, [8, 2]]]).encode(), data=b"\0" * 64, dtype="float16",
         compress=True)
@example(layout=json.dumps([[A, [4, 8]], [B, [8, 4]]]).encode(), data=b"\xff" * 128, dtype="float16",
         compress=True)  # NaN everywhere
def test_any_packed_update_validates_or_is_rejected_with_a_reason(layout, data, dtype, compress):
    check(packed(layout, data, dtype, compress))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_genuine_update_with_bytes_flipped_validates_or_is_rejected(flips):
    record = to_record({A: np.ones((4, 8), np.float32), B: np.ones((8, 4), np.float32)})
    layout, values = bytearray(record[LAYOUT].data), bytearray(record[TENSORS].data)
    for where, byte in flips:
        target = layout if where % 2 else values
        target[where % len(target)] = byte
    check(packed(bytes(layout), bytes(values), "float16", compress=False))
