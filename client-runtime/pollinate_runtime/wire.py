"""Adapter tensors on the wire: AdapterState <-> Flower ArrayRecord, and validation of updates.

An adapter is an `AdapterState`: PEFT state-dict names (what `peft.get_peft_model_state_dict`
returns, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) mapped to numpy
arrays. `lora_A` tensors are (r, in) and `lora_B` tensors are (out, r), so the rank is axis 0 of
an A and axis 1 of a B (`rank_axis`).

Transport dtypes: float16 (default: half the bytes of float32, and LoRA deltas sit well inside
its range), float32, and bfloat16. Numpy has no bfloat16 without ml_dtypes, so bfloat16 travels
as its raw little-endian 16-bit patterns in an Array with stype `pollinate.bfloat16-bits`, and
decodes to float32 (exact: a bfloat16 is the top half of a float32). float16 and float32 use
Flower's own `numpy.ndarray` serialisation, so Flower's tools read them too.

Everything arriving from a site is untrusted. `validate_update` decodes and checks a reply before
any of it touches the aggregate, and raises `UpdateRejected(reason, message)` with a stable,
greppable reason (`RejectReason`) and a message naming the tensor, what it was and what was
expected. Checks run cheapest first, so a replayed or empty reply costs no decoding. The returned
arrays keep their wire dtype (float16 stays float16: the aggregators upcast block by block), and
bfloat16 comes back as float32. Decoded float16/float32 arrays are read-only views of the
received bytes (npy header parsed here, never np.load's pickle path, no copy).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from flwr.app import Array, ArrayRecord

AdapterState = dict[str, np.ndarray]

# Flower's serialisation type for np.save'd arrays (flwr.common.constant.SType.NUMPY).
NUMPY_STYPE = "numpy.ndarray"
BFLOAT16_STYPE = "pollinate.bfloat16-bits"
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


def encode_array(name: str, values: np.ndarray, dtype: str = "float16") -> Array:
    """One tensor as a Flower Array in transport dtype `dtype`."""
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype {dtype!r} is not one of {', '.join(TRANSPORT_DTYPES)}")
    if dtype == "bfloat16":
        bits = _float32_to_bfloat16_bits(np.asarray(values, dtype=np.float32))
        return Array(
            dtype="bfloat16", shape=tuple(int(d) for d in bits.shape), stype=BFLOAT16_STYPE,
            data=bits.astype("<u2", copy=False).tobytes(order="C"),
        )
    if dtype == "float16" and values.size and values.dtype != np.float16:
        # Casting would silently turn these into inf and the server would reject the whole update.
        peak = float(np.max(np.abs(values)))
        if math.isfinite(peak) and peak > _FLOAT16_MAX:
            raise ValueError(
                f"tensor {name!r} has values up to {peak:.6g}, beyond float16's {_FLOAT16_MAX:g}; "
                "use transport dtype bfloat16 or float32"
            )
    return Array(np.ascontiguousarray(values, dtype=np.dtype(dtype)))


def to_record(adapter: Mapping[str, np.ndarray], dtype: str = "float16") -> ArrayRecord:
    """An adapter as a Flower ArrayRecord in transport dtype `dtype` (float16 by default)."""
    record = ArrayRecord()
    for name, values in adapter.items():
        record[name] = encode_array(name, np.asarray(values), dtype)
    return record


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data a record puts on the wire (what Flower chunks and sends)."""
    return sum(len(array.data) for array in record.values())


def decode_array(name: str, array: Array) -> np.ndarray:
    """One Flower Array back to numpy; raises UpdateRejected if it is not what it claims to be."""
    declared = tuple(int(d) for d in array.shape)
    if array.dtype not in TRANSPORT_DTYPES:
        raise _wrong_dtype(name, array.dtype)
    if array.dtype == "bfloat16":
        if array.stype != BFLOAT16_STYPE:
            raise UpdateRejected(
                RejectReason.MALFORMED,
                f"tensor {name!r} is bfloat16 with stype {array.stype!r}; "
                f"expected {BFLOAT16_STYPE!r}",
                name,
            )
        expected_bytes = 2 * math.prod(declared)
        if len(array.data) != expected_bytes:
            raise UpdateRejected(
                RejectReason.MALFORMED,
                f"tensor {name!r} declares shape {declared} (bfloat16, {expected_bytes} bytes) "
                f"but carries {len(array.data)} bytes",
                name,
            )
        bits = np.frombuffer(array.data, dtype="<u2").reshape(declared)
        return _bfloat16_bits_to_float32(bits)
    if array.stype != NUMPY_STYPE:
        raise UpdateRejected(
            RejectReason.MALFORMED,
            f"tensor {name!r} has stype {array.stype!r}; expected {NUMPY_STYPE!r}",
            name,
        )
    values = _read_npy(name, array.data)
    if not isinstance(values, np.ndarray) or values.dtype.str not in ("<f2", "<f4"):
        found = getattr(values, "dtype", type(values).__name__)
        raise UpdateRejected(
            RejectReason.WRONG_DTYPE,
            f"tensor {name!r} declares {array.dtype} but holds {found}; "
            "expected little-endian float16 or float32",
            name,
        )
    if str(values.dtype) != array.dtype or tuple(values.shape) != declared:
        raise UpdateRejected(
            RejectReason.MALFORMED,
            f"tensor {name!r} declares {array.dtype} {declared} but holds "
            f"{values.dtype} {tuple(values.shape)}",
            name,
        )
    return values


def _read_npy(name: str, data: bytes) -> np.ndarray:
    """The array in np.save bytes, as a read-only view of `data` (no copy, never unpickled)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"npy format version {version} is not supported")
    except (ValueError, OSError, EOFError, SyntaxError) as err:
        raise UpdateRejected(
            RejectReason.MALFORMED, f"tensor {name!r} is not a readable numpy array: {err}", name
        ) from err
    if dtype.hasobject:
        raise UpdateRejected(
            RejectReason.MALFORMED,
            f"tensor {name!r} holds Python objects (pickled); expected float16 or float32 numbers",
            name,
        )
    count = math.prod(shape)
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise UpdateRejected(
            RejectReason.MALFORMED,
            f"tensor {name!r} declares {count} values of {dtype} in its header but carries "
            f"{len(data) - offset} bytes",
            name,
        )
    # A view instead of np.load's copy: decoding an update costs no memory traffic.
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


def from_record(record: ArrayRecord) -> AdapterState:
    """A trusted record (e.g. the global adapter the server sent) back to an AdapterState."""
    return {name: decode_array(name, array) for name, array in record.items()}


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


def _sum_of_squares(values: np.ndarray) -> float:
    flat = values.reshape(-1)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    # float32 dot products run on BLAS; float16 squares would overflow past 255. An overflow
    # to inf is an answer here (the caller tells non-finite values from huge ones).
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.dot(flat, flat))


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
    if len(record_or_state) == 0:
        raise UpdateRejected(
            RejectReason.EMPTY,
            f"the update holds no tensors; expected the {len(spec.tensors)} tensors of the adapter",
        )
    names = list(record_or_state.keys())
    _check_names(names, spec)

    if isinstance(record_or_state, ArrayRecord):
        for name, array in record_or_state.items():
            if array.dtype not in TRANSPORT_DTYPES:
                raise _wrong_dtype(name, array.dtype)
        _check_shapes({n: tuple(int(d) for d in a.shape) for n, a in record_or_state.items()}, spec)
        state = {name: decode_array(name, array) for name, array in record_or_state.items()}
    else:
        state = {}
        for name, values in record_or_state.items():
            if not isinstance(values, np.ndarray) or values.dtype.name not in TRANSPORT_DTYPES:
                raise _wrong_dtype(name, getattr(values, "dtype", type(values).__name__))
            # bfloat16 only exists in numpy through ml_dtypes; widen it once here.
            state[name] = values.astype(np.float32) if values.dtype.name == "bfloat16" else values
        _check_shapes({n: tuple(v.shape) for n, v in state.items()}, spec)

    total, largest, largest_name = 0.0, -1.0, ""
    for name, values in state.items():
        squares = _sum_of_squares(values)
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
