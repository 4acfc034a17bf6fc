"""Compiled loops for the server's hot paths: folding updates into float32 accumulators, the
sum of squares behind every update's norm check, and widening float16 to float32.

Why compiled. A round's aggregation reads every byte every site sent; numpy's float16 is scalar
(about 3 ns per element), so the server spent 5 ns per parameter per site on widening, scaling,
adding and norms. These loops are compiled by numba for the host CPU: `float16 -> float32` is
LLVM's `fpext half` (vcvtph2ps on x86 with F16C, one instruction per 8 values, exact for every
half including subnormals, infinities and NaN), and LLVM vectorises the rest.

Why batched. `fold` adds several sites' updates to one accumulator block while it sits in cache:
each block of float32 accumulators is read and written once per batch, not once per site, so
the memory traffic approaches the bytes of the updates themselves (see bench/aggregation.py).

Arrays of float16 arrive here viewed as uint16 (numba has no float16 array type); the public
functions take float16 or float32 arrays and do that themselves. Compiled code is cached on disk
(NUMBA_CACHE_DIR, by default ~/.cache/pollinate/numba or a temporary directory when the home is
read-only, as in a pod), so only the first process on a machine pays the compile. Calls are
serialised by a lock: numba's default threading layer must not be entered by two threads at once.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _cache_dir() -> str:
    try:
        home: Path | None = Path.home()
    except RuntimeError:  # no HOME and no passwd entry (an arbitrary container uid)
        home = None
    candidates = [Path(tempfile.gettempdir()) / f"pollinate-numba-{os.getuid()}"]
    if home is not None:
        candidates.insert(0, home / ".cache" / "pollinate" / "numba")
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return str(candidate)
        except OSError:
            continue
    return tempfile.mkdtemp(prefix="pollinate-numba-")


os.environ.setdefault("NUMBA_CACHE_DIR", _cache_dir())

from llvmlite import ir  # noqa: E402 - numba reads NUMBA_CACHE_DIR when it is imported
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402
from numba.typed import List  # noqa: E402

# Accumulator elements per block: 64 Ki float32 = 256 KiB, resident in L2 while a batch folds.
FOLD_BLOCK = 1 << 16
# Elements per block of a reduction (partial sums are float64, one per block).
REDUCE_BLOCK = 1 << 15

_LOCK = threading.Lock()


@intrinsic
def _widen(typingctx, value):  # type: ignore[no-untyped-def]
    """One element as float32: a uint16 holds float16 bits (LLVM `fpext half`), a float32 is
    itself."""
    if value == types.uint16:
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    elif value == types.float32:
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return args[0]
    else:
        return None
    return types.float32(value), codegen


@njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def _fold_flat(acc, updates, weights, overwrite, scale):  # type: ignore[no-untyped-def]
    n = acc.size
    count = len(updates)
    for block in prange((n + FOLD_BLOCK - 1) // FOLD_BLOCK):
        lo = block * FOLD_BLOCK
        hi = min(n, lo + FOLD_BLOCK)
        out = acc[lo:hi]
        if overwrite:  # the block may hold anything: start it from zero, in cache
            for i in range(hi - lo):
                out[i] = 0.0
        k = 0
        # Up to four sites per pass over the block: one read and write of the accumulators per
        # four updates (eight streams at once measured no faster).
        while k < count:
            left = count - k
            if left >= 4:
                u0, u1 = updates[k][lo:hi], updates[k + 1][lo:hi]
                u2, u3 = updates[k + 2][lo:hi], updates[k + 3][lo:hi]
                w0, w1, w2, w3 = weights[k], weights[k + 1], weights[k + 2], weights[k + 3]
                for i in range(hi - lo):
                    out[i] += (w0 * _widen(u0[i]) + w1 * _widen(u1[i])) + (
                        w2 * _widen(u2[i]) + w3 * _widen(u3[i]))
                k += 4
            elif left == 3:
                u0, u1, u2 = updates[k][lo:hi], updates[k + 1][lo:hi], updates[k + 2][lo:hi]
                w0, w1, w2 = weights[k], weights[k + 1], weights[k + 2]
                for i in range(hi - lo):
                    out[i] += (w0 * _widen(u0[i]) + w1 * _widen(u1[i])) + w2 * _widen(u2[i])
                k += 3
            elif left == 2:
                u0, u1 = updates[k][lo:hi], updates[k + 1][lo:hi]
                w0, w1 = weights[k], weights[k + 1]
                for i in range(hi - lo):
                    out[i] += w0 * _widen(u0[i]) + w1 * _widen(u1[i])
                k += 2
            else:
                u0, w0 = updates[k][lo:hi], weights[k]
                for i in range(hi - lo):
                    out[i] += w0 * _widen(u0[i])
                k += 1
        if scale != 1.0:  # the mean's division, while the block is still in cache
            for i in range(hi - lo):
                out[i] *= scale


@njit(nogil=True, cache=True, boundscheck=False)
def _fold_rows(dst, src, weight):  # type: ignore[no-untyped-def]
    for r in range(src.shape[0]):
        for c in range(src.shape[1]):
            dst[r, c] += weight * _widen(src[r, c])


@njit(nogil=True, cache=True, boundscheck=False)
def _widen_rows(dst, src):  # type: ignore[no-untyped-def]
    for r in range(src.shape[0]):
        for c in range(src.shape[1]):
            dst[r, c] = _widen(src[r, c])


# Re-associating the sum lets LLVM vectorise it; no other fast-math flag, so inf and NaN still
# propagate into the result (the norm check relies on that). Loops run over a slice from 0, as
# in every kernel here: a `range(lo, hi)` index kept LLVM from vectorising (6x slower).
@njit(parallel=True, nogil=True, cache=True, boundscheck=False, fastmath={"reassoc"})
def _sum_of_squares(values):  # type: ignore[no-untyped-def]
    n = values.size
    blocks = (n + REDUCE_BLOCK - 1) // REDUCE_BLOCK
    partial = np.zeros(blocks, np.float64)
    for block in prange(blocks):
        lo = block * REDUCE_BLOCK
        hi = min(n, lo + REDUCE_BLOCK)
        part = values[lo:hi]
        total = np.float32(0.0)
        for i in range(hi - lo):
            v = _widen(part[i])
            total += v * v
        partial[block] = total
    return partial.sum()


def _as_kernel_input(values: np.ndarray) -> np.ndarray:
    """float16 as its uint16 bits, float32 as is; read-only, so one compiled variant serves
    received (read-only) buffers and local arrays alike."""
    if values.dtype == np.float16:
        values = values.view(np.uint16)
    elif values.dtype != np.float32:
        raise TypeError(f"expected float16 or float32 values, got {values.dtype}")
    view = values.view()
    view.flags.writeable = False
    return view


def _flat(values: np.ndarray) -> np.ndarray:
    if not values.flags.c_contiguous:
        raise ValueError("expected a contiguous array")
    return _as_kernel_input(values.reshape(-1))


def _float32_target(acc: np.ndarray, name: str) -> None:
    if acc.dtype != np.float32 or not acc.flags.writeable:
        raise TypeError(f"{name} must be a writable float32 array, got {acc.dtype}")


def fold(acc: np.ndarray, updates: Sequence[np.ndarray], weights: Sequence[float], *,
         overwrite: bool = False, scale: float = 1.0) -> None:
    """acc = scale * (acc + sum_k weights[k] * updates[k]), in float32, for 1-D contiguous
    `updates` (float16 or float32, mixed) of acc's size. With `overwrite`, acc's old values are
    ignored (it may come from np.empty: each block is zeroed in cache, saving a pass)."""
    _float32_target(acc, "the accumulator")
    if acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ValueError("the accumulator must be a 1-D contiguous array")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if not updates:
        raise ValueError("no updates to fold")
    for values in updates:
        if values.size != acc.size:
            raise ValueError(f"an update has {values.size} values; the accumulator {acc.size}")
    groups: dict[np.dtype, tuple[list[np.ndarray], list[float]]] = {}
    for values, weight in zip(updates, weights, strict=True):
        arrays, ws = groups.setdefault(values.dtype, ([], []))
        arrays.append(_flat(values))
        ws.append(weight)
    last = len(groups) - 1
    with _LOCK:
        for g, (arrays, ws) in enumerate(groups.values()):
            _fold_flat(acc, List(arrays), np.asarray(ws, np.float32), overwrite and g == 0,
                       np.float32(scale if g == last else 1.0))


def fold_rows(dst: np.ndarray, src: np.ndarray, weight: float) -> None:
    """dst += weight * src for 2-D arrays of one shape (dst float32, may be a strided region;
    src float16 or float32)."""
    _float32_target(dst, "the destination")
    if dst.ndim != 2 or dst.shape != src.shape:
        raise ValueError(f"shapes differ: destination {dst.shape}, source {src.shape}")
    with _LOCK:
        _fold_rows(dst, _as_kernel_input(src), np.float32(weight))


def to_float32(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`src` (float16 or float32, 2-D) widened into `out` (a new array by default)."""
    if out is None:
        out = np.empty(src.shape, np.float32)
    _float32_target(out, "out")
    if src.ndim != 2 or out.shape != src.shape:
        raise ValueError(f"expected 2-D arrays of one shape, got {src.shape} and {out.shape}")
    with _LOCK:
        _widen_rows(out, _as_kernel_input(src))
    return out


def sum_of_squares(values: np.ndarray) -> float:
    """The sum of squares of a contiguous float16 or float32 array (each square in float32,
    partial sums in float64). Any inf or NaN value makes the result inf or NaN."""
    with _LOCK:
        return float(_sum_of_squares(_flat(values)))
