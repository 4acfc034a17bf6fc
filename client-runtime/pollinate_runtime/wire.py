"""Adapter tensors on the wire: AdapterState <-> Flower ArrayRecord, and validation of updates.

An adapter is an `AdapterState`: PEFT state-dict names (what `peft.get_peft_model_state_dict`
returns, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) mapped to numpy
arrays. `lora_A` tensors are (r, in) and `lora_B` tensors are (out, r), so the rank is axis 0 of
an A and axis 1 of a B (`rank_axis`).

Transport dtypes: float16 (default: half the bytes of float32, and LoRA deltas sit well inside
its range), float32, and bfloat16 (numpy has none without ml_dtypes: it travels as its raw
16-bit patterns and decodes to float32, exactly, since a bfloat16 is the top half of a float32).
A whole adapter travels packed, as two Arrays (see "the packed record" below).

Everything arriving from a site is untrusted. `validate_update` decodes and checks a reply before
any of it touches the aggregate, and raises `UpdateRejected(reason, message)` with a stable,
greppable reason (`RejectReason`) and a message naming the tensor, what it was and what was
expected. Checks run cheapest first: the round, then the size, then the layout (names, dtype,
shapes), then the values, so a replayed, empty or oversized reply costs no decoding. The
returned arrays keep their wire dtype (float16 stays float16: the aggregators upcast block by
block) and are read-only views of the received bytes (no copy; nothing is ever unpickled).
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from flwr.app import Array, ArrayRecord

AdapterState = dict[str, np.ndarray]


class PackedAdapter(dict[str, np.ndarray]):
    """An AdapterState decoded from a packed record: its tensors are consecutive views of
    `flat`, the received values in their wire dtype, in `layout` order ((name, shape) pairs), so
    a reader may check the whole layout at once and take the update as one array. `flat` is None
    when the tensors had to be widened (bfloat16)."""

    flat: np.ndarray | None = None
    layout: tuple[tuple[str, tuple[int, ...]], ...] = ()

TRANSPORT_DTYPES = ("float16", "bfloat16", "float32")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class RejectReason(StrEnum):
    """Why an update was dropped; CamelCase like Kubernetes condition reasons."""

    EMPTY = "EmptyUpdate"
    UNKNOWN_TENSOR = "UnknownTensor"
    MISSING_TENSOR = "MissingTensor"
    WRONG_DTYPE = "WrongDtype"
    WRONG_SHAPE = "WrongShape"
    MALFORMED = "MalformedTensor"
    NON_FINITE = "NonFiniteValues"
    NORM_TOO_LARGE = "NormTooLarge"
    STALE_ROUND = "StaleRound"
    OVERSIZED = "OversizedUpdate"
    BAD_EXAMPLE_COUNT = "InvalidExampleCount"
    BAD_METRIC = "InvalidMetric"


class UpdateRejected(Exception):
    """A site's update failed validation; `reason` is stable, `message` is for people."""

    def __init__(self, reason: RejectReason, message: str, tensor: str | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.tensor = tensor


def _wrong_dtype(name: str, found: object) -> UpdateRejected:
    return UpdateRejected(
        RejectReason.WRONG_DTYPE,
        f"tensor {name!r} has dtype {found}; expected one of {', '.join(TRANSPORT_DTYPES)}",
        name,
    )


def rank_axis(name: str) -> int | None:
    """The axis holding the LoRA rank of tensor `name`, or None for a tensor without one."""
    if ".lora_A." in name or ".lora_embedding_A" in name:
        return 0
    if ".lora_B." in name or ".lora_embedding_B" in name:
        return 1
    return None


def partner_name(name: str) -> str | None:
    """The other half of a LoRA pair (A <-> B), or None for a tensor without one."""
    for a, b in ((".lora_A.", ".lora_B."), (".lora_embedding_A", ".lora_embedding_B")):
        if a in name:
            return name.replace(a, b)
        if b in name:
            return name.replace(b, a)
    return None


# ---- encoding -----------------------------------------------------------------------------


def truncate_to_rank(adapter: Mapping[str, np.ndarray], rank: int) -> AdapterState:
    """The adapter a rank-`rank` site trains: the first `rank` rows of each lora_A and columns
    of each lora_B (contiguous copies, ready to encode); other tensors unchanged."""
    if rank < 1:
        raise ValueError(f"rank {rank} is not a LoRA rank; expected an integer >= 1")
    out: AdapterState = {}
    for name, values in adapter.items():
        axis = rank_axis(name) if values.ndim == 2 else None
        if axis is None:
            out[name] = values
            continue
        if rank > values.shape[axis]:
            raise ValueError(
                f"tensor {name!r} has rank {values.shape[axis]}; cannot truncate it to rank {rank}"
            )
        kept = values[:rank] if axis == 0 else values[:, :rank]
        out[name] = np.ascontiguousarray(kept)
    return out


def _float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    # Round to nearest even on the dropped 16 bits, as torch and XLA do; NaN stays a quiet NaN.
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- the packed record ----------------------------------------------------------------------
#
# A whole adapter travels as one ArrayRecord of two Arrays: `tensors`, every tensor's values
# one after another (C order, little-endian, in the transport dtype; bfloat16 as its 16-bit
# patterns), and `layout`, the tensors' names and shapes in that order as zlib-compressed
# JSON. Flower 1.41 sends every Array as objects of their own, each its own HTTP request with
# headers and ids: one Array per tensor put 9-60% on top of the values for a SmolLM2 adapter,
# two Arrays put well under 1% (bench/wire_bytes.py).

TENSORS = "tensors"
LAYOUT = "layout"
PACKED_STYPE = "pollinate.packed"
LAYOUT_STYPE = "pollinate.layout+json+zlib"
MAX_LAYOUT_BYTES = 4 << 20  # decompressed: about 40,000 tensor names; no adapter comes close
MAX_NDIM = 8
# The compressed layout of an honest update: names and shapes, well under 256 bytes a tensor.
LAYOUT_ALLOWANCE_BYTES = 64 << 10
_WIRE_DTYPES = {"float16": "<f2", "float32": "<f4", "bfloat16": "<u2"}

Layout = tuple[tuple[str, tuple[int, ...]], ...]


def _checked_for_float16(name: str, values: np.ndarray) -> None:
    if values.size and values.dtype != np.float16:
        # Casting would silently turn these into inf and the server would reject the whole update.
        peak = float(np.max(np.abs(values)))
        if math.isfinite(peak) and peak > _FLOAT16_MAX:
            raise ValueError(
                f"tensor {name!r} has values up to {peak:.6g}, beyond float16's {_FLOAT16_MAX:g}; "
                "use transport dtype bfloat16 or float32"
            )


def to_record(adapter: Mapping[str, np.ndarray], dtype: str = "float16") -> ArrayRecord:
    """An adapter as a packed Flower ArrayRecord in transport dtype `dtype` (float16 by default)."""
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype {dtype!r} is not one of {', '.join(TRANSPORT_DTYPES)}")
    pieces, layout = [], []
    for name, values in adapter.items():
        values = np.asarray(values)
        if dtype == "float16":
            _checked_for_float16(name, values)
        if dtype == "bfloat16":
            piece = _float32_to_bfloat16_bits(np.asarray(values, dtype=np.float32))
        else:
            piece = np.asarray(values, dtype=_WIRE_DTYPES[dtype])
        pieces.append(piece.reshape(-1))
        layout.append([name, [int(d) for d in values.shape]])
    flat = np.concatenate(pieces).astype(_WIRE_DTYPES[dtype], copy=False) if pieces \
        else np.empty(0, _WIRE_DTYPES[dtype])
    layout_bytes = zlib.compress(json.dumps(layout, separators=(",", ":")).encode(), 9)
    return ArrayRecord({
        LAYOUT: Array(dtype="uint8", shape=(len(layout_bytes),), stype=LAYOUT_STYPE, data=layout_bytes),
        TENSORS: Array(dtype=dtype, shape=(int(flat.size),), stype=PACKED_STYPE, data=flat.tobytes()),
    })


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record puts on the wire (values and layout)."""
    return sum(len(array.data) for array in record.values())


def _malformed(message: str, tensor: str | None = None) -> UpdateRejected:
    return UpdateRejected(RejectReason.MALFORMED, message, tensor)


def _read_layout(array: Array) -> Layout:
    if array.stype != LAYOUT_STYPE:
        raise _malformed(f"the {LAYOUT!r} array has stype {array.stype!r}; expected {LAYOUT_STYPE!r}")
    return _parse_layout(bytes(array.data))


# Every site of a round sends the same layout: parsed once (a 610-tensor layout took 1-2 ms,
# as long as folding the update). Only well-formed layouts are cached; errors raise every time.
@functools.lru_cache(maxsize=16)
def _parse_layout(data: bytes) -> Layout:
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(data, MAX_LAYOUT_BYTES)
    except zlib.error as err:
        raise _malformed(f"the {LAYOUT!r} array is not zlib-compressed data: {err}") from err
    if inflate.unconsumed_tail:
        raise _malformed(f"the {LAYOUT!r} array inflates beyond {MAX_LAYOUT_BYTES} bytes")
    if not inflate.eof:
        raise _malformed(f"the {LAYOUT!r} array is truncated zlib data")
    try:
        entries = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise _malformed(f"the {LAYOUT!r} array is not JSON: {err}") from err
    if not isinstance(entries, list):
        raise _malformed(f"the layout is a {type(entries).__name__}; expected a list of [name, shape]")
    layout: list[tuple[str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
              and isinstance(entry[1], list) and len(entry[1]) <= MAX_NDIM
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in entry[1]))
        if not ok:
            raise _malformed(f"layout entry {i} is {str(entry)[:80]}; expected [name, [dims >= 0, ...]] "
                             f"with at most {MAX_NDIM} dims")
        name = entry[0]
        if name in seen:
            raise _malformed(f"tensor {name!r} appears twice in the layout", name)
        seen.add(name)
        layout.append((name, tuple(entry[1])))
    return tuple(layout)


def _packed_parts(record: ArrayRecord) -> tuple[Layout, Array]:
    """The layout and the values array of a packed record, checked for form (not content)."""
    keys = set(record.keys())
    if keys != {LAYOUT, TENSORS}:
        raise _malformed(f"the adapter record holds arrays {sorted(keys)[:4]}; expected exactly "
                         f"{LAYOUT!r} and {TENSORS!r} (a packed adapter)")
    layout = _read_layout(record[LAYOUT])
    values = record[TENSORS]
    if values.dtype not in TRANSPORT_DTYPES:
        raise UpdateRejected(
            RejectReason.WRONG_DTYPE,
            f"the tensors have dtype {values.dtype}; expected one of {', '.join(TRANSPORT_DTYPES)}")
    if values.stype != PACKED_STYPE:
        raise _malformed(f"the {TENSORS!r} array has stype {values.stype!r}; expected {PACKED_STYPE!r}")
    return layout, values


def _views(layout: Layout, values: Array) -> PackedAdapter:
    """Each tensor as a read-only view of the received bytes (bfloat16 widened to float32)."""
    wire = np.dtype(_WIRE_DTYPES[values.dtype])
    count = sum(math.prod(shape) for _, shape in layout)
    if len(values.data) != count * wire.itemsize:
        raise _malformed(f"the layout describes {count} values of {values.dtype} "
                         f"({count * wire.itemsize} bytes) but the tensors carry {len(values.data)} bytes")
    flat = np.frombuffer(values.data, dtype=wire)
    out = PackedAdapter()
    offset = 0
    for name, shape in layout:
        size = math.prod(shape)
        piece = flat[offset: offset + size].reshape(shape)
        out[name] = _bfloat16_bits_to_float32(piece) if values.dtype == "bfloat16" else piece
        offset += size
    if values.dtype != "bfloat16":
        out.flat = flat
    out.layout = layout
    return out


def from_record(record: ArrayRecord) -> PackedAdapter:
    """A packed record back to an AdapterState (float16 stays float16, bfloat16 becomes float32);
    raises UpdateRejected if it is not a well-formed packed adapter."""
    return _views(*_packed_parts(record))


# ---- the expected adapter -----------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """The shape a tensor must have; along `rank_axis` any size 1..shape[rank_axis] is fine."""

    shape: tuple[int, ...]
    rank_axis: int | None

    @property
    def max_rank(self) -> int | None:
        return None if self.rank_axis is None else self.shape[self.rank_axis]

    def describe(self) -> str:
        if self.rank_axis is None:
            return str(self.shape)
        dims = ["r" if i == self.rank_axis else str(d) for i, d in enumerate(self.shape)]
        return f"({', '.join(dims)}) with 1 <= r <= {self.max_rank}"

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        for axis, (got, want) in enumerate(zip(shape, self.shape, strict=True)):
            if axis == self.rank_axis:
                if not 1 <= got <= want:
                    return False
            elif got != want:
                return False
        return True


@dataclass(frozen=True)
class AdapterSpec:
    """What a valid update looks like: the tensor names and shapes of the global adapter."""

    tensors: Mapping[str, TensorSpec]

    @classmethod
    def from_template(cls, template: Mapping[str, np.ndarray]) -> AdapterSpec:
        """The spec of adapters shaped like `template` (its ranks are the maximum ranks)."""
        if not template:
            raise ValueError("an adapter template needs at least one tensor")
        tensors = {}
        for name, values in template.items():
            shape = tuple(int(d) for d in np.shape(values))
            axis = rank_axis(name) if len(shape) == 2 else None
            tensors[name] = TensorSpec(shape, axis)
        return cls(tensors)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    @property
    def max_update_bytes(self) -> int:
        """The most bytes an honest update of this adapter carries: every value in the widest
        transport dtype (float32) plus its compressed layout, with room to spare."""
        return 4 * self.num_parameters + LAYOUT_ALLOWANCE_BYTES + 256 * len(self.tensors)


# ---- validation ---------------------------------------------------------------------------


def _check_round(expected_round: int | None, reported_round: int | None) -> None:
    if expected_round is None:
        return
    if reported_round is None:
        raise UpdateRejected(
            RejectReason.STALE_ROUND,
            f"the reply carries no round number; expected round {expected_round}",
        )
    if int(reported_round) != int(expected_round):
        raise UpdateRejected(
            RejectReason.STALE_ROUND,
            f"the reply is for round {reported_round}; expected round {expected_round} "
            "(a late or replayed reply)",
        )


def _check_names(names: list[str], spec: AdapterSpec) -> None:
    unknown = [n for n in names if n not in spec.tensors]
    if unknown:
        raise UpdateRejected(
            RejectReason.UNKNOWN_TENSOR,
            f"tensor {unknown[0]!r} is not part of the adapter"
            + (f" ({len(unknown) - 1} more unknown)" if len(unknown) > 1 else "")
            + f"; expected only the {len(spec.tensors)} tensors of the global adapter",
            unknown[0],
        )
    present = set(names)
    missing = [n for n in spec.tensors if n not in present]
    if missing:
        raise UpdateRejected(
            RejectReason.MISSING_TENSOR,
            f"tensor {missing[0]!r} is missing"
            + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + f"; expected all {len(spec.tensors)} tensors of the global adapter",
            missing[0],
        )


def _check_shapes(shapes: Mapping[str, tuple[int, ...]], spec: AdapterSpec) -> None:
    for name, shape in shapes.items():
        want = spec.tensors[name]
        if not want.accepts(shape):
            raise UpdateRejected(
                RejectReason.WRONG_SHAPE,
                f"tensor {name!r} has shape {shape}; expected {want.describe()}",
                name,
            )
    # The A and B of one module must agree on the rank, or B @ A is not defined.
    for name, shape in shapes.items():
        if rank_axis(name) != 0:
            continue
        partner = partner_name(name)
        if partner in shapes and spec.tensors[partner].rank_axis == 1:
            rank_a, rank_b = shape[0], shapes[partner][1]
            if rank_a != rank_b:
                raise UpdateRejected(
                    RejectReason.WRONG_SHAPE,
                    f"tensor {partner!r} has rank {rank_b} but its pair {name!r} has rank "
                    f"{rank_a}; expected equal ranks",
                    partner,
                )


def check_update_size(received_bytes: int, spec: AdapterSpec) -> None:
    """Refuse a reply carrying more array bytes than any update of `spec` can (checked before
    anything is decoded: a site must not make the server read or fold an arbitrary amount)."""
    if received_bytes > spec.max_update_bytes:
        raise UpdateRejected(
            RejectReason.OVERSIZED,
            f"the reply carries {received_bytes} bytes of arrays; an update of this adapter "
            f"({spec.num_parameters} values in {len(spec.tensors)} tensors) is at most "
            f"{spec.max_update_bytes} bytes",
        )


def _empty(spec: AdapterSpec) -> UpdateRejected:
    return UpdateRejected(
        RejectReason.EMPTY,
        f"the update holds no tensors; expected the {len(spec.tensors)} tensors of the adapter",
    )


def validate_update(
    record_or_state: ArrayRecord | Mapping[str, np.ndarray],
    spec: AdapterSpec,
    *,
    max_norm: float,
    expected_round: int | None = None,
    reported_round: int | None = None,
) -> AdapterState:
    """Decode and check a site's update; return it, or raise UpdateRejected saying why.

    `max_norm` bounds the L2 norm of the whole update as sent (use math.inf for no bound).
    With `expected_round`, a reply must report exactly that round: anything else is a late or
    replayed reply.
    """
    _check_round(expected_round, reported_round)
    if isinstance(record_or_state, ArrayRecord):
        # Size first, then form, names, dtype and shapes from the layout before any value.
        if len(record_or_state) == 0:
            raise _empty(spec)
        check_update_size(payload_bytes(record_or_state), spec)
        layout, values = _packed_parts(record_or_state)
        if not layout:
            raise _empty(spec)
        _check_names([n for n, _ in layout], spec)
        _check_shapes(dict(layout), spec)
        state = _views(layout, values)
    else:
        if len(record_or_state) == 0:
            raise _empty(spec)
        _check_names(list(record_or_state.keys()), spec)
        state = {}
        for name, values in record_or_state.items():
            if not isinstance(values, np.ndarray) or values.dtype.name not in TRANSPORT_DTYPES:
                raise _wrong_dtype(name, getattr(values, "dtype", type(values).__name__))
            # bfloat16 only exists in numpy through ml_dtypes; widen it once here.
            state[name] = values.astype(np.float32) if values.dtype.name == "bfloat16" else values
        _check_shapes({n: tuple(v.shape) for n, v in state.items()}, spec)

    # Imported here, not at the top: the operator reads stores through this module and has no
    # use for the compiler behind the kernels.
    from . import kernels

    if isinstance(state, PackedAdapter) and state.flat is not None:
        # One pass over the whole update; the per-tensor pass below only runs to explain a
        # rejection.
        total = kernels.sum_of_squares(state.flat)
        if math.isfinite(total) and math.sqrt(total) <= max_norm:
            return state
    total, largest, largest_name = 0.0, -1.0, ""
    for name, values in state.items():
        squares = kernels.sum_of_squares(np.ascontiguousarray(values))
        if squares > largest:
            largest, largest_name = squares, name
        if not math.isfinite(squares):
            bad = ~np.isfinite(values)
            if bad.any():
                index = tuple(int(i) for i in np.argwhere(bad)[0])
                raise UpdateRejected(
                    RejectReason.NON_FINITE,
                    f"tensor {name!r} holds {int(bad.sum())} non-finite values "
                    f"(first {values[index]} at index {index}); expected finite numbers",
                    name,
                )
            # Finite values whose squares overflow float32 are certainly beyond any sane bound.
        total += squares
    norm = math.sqrt(total)
    if not norm <= max_norm:
        raise UpdateRejected(
            RejectReason.NORM_TOO_LARGE,
            f"the update's L2 norm is {norm:.6g}; expected at most {max_norm:.6g} "
            f"(largest part: tensor {largest_name!r}, norm {math.sqrt(largest):.6g})",
            largest_name,
        )
    return state


# A mean cross-entropy per token: ln(vocabulary size) for a model that guesses uniformly
# (about 12 for 150,000 tokens); a thousand is far past any model that trains at all.
MAX_REPORTED_LOSS = 1000.0


def example_weight(reported: object, cap: int, name: str = "num-examples") -> tuple[int, bool]:
    """A site's reported example count as the weight of its update, and whether it was capped
    at `cap`. Anything but a finite whole number of at least 1 (NaN, inf, 0, -1, 2.5, text,
    a list, a bool) is rejected: the site is named and the round goes on without it."""
    if isinstance(reported, bool) or not isinstance(reported, (int, float)):
        raise UpdateRejected(RejectReason.BAD_EXAMPLE_COUNT,
                             f"{name} is {type(reported).__name__} {reported!r:.40}, "
                             "expected a whole number >= 1")
    value = float(reported)
    if not math.isfinite(value) or value < 1 or not value.is_integer():
        raise UpdateRejected(RejectReason.BAD_EXAMPLE_COUNT,
                             f"{name} is {reported!r}, expected a whole number >= 1")
    return (cap, True) if value > cap else (int(value), False)


def reported_loss(name: str, reported: object) -> float:
    """A loss a site reports (training, or an adapter's on its held-out data): a finite number
    in [0, MAX_REPORTED_LOSS], as a mean cross-entropy per token is; anything else would make
    the round's reported loss or perplexity NaN or infinite (which no JSON status can hold) or
    let one site claim a perfect score."""
    if isinstance(reported, bool) or not isinstance(reported, (int, float)) \
            or not 0 <= float(reported) <= MAX_REPORTED_LOSS:  # NaN compares False
        raise UpdateRejected(RejectReason.BAD_METRIC,
                             f"{name} is {reported!r:.40}, expected a number in [0, {MAX_REPORTED_LOSS:g}]")
    return float(reported)
