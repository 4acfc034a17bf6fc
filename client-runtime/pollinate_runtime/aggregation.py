"""Streaming aggregation of LoRA adapters: one site's update at a time, never all of them at once.

A round is a `RoundMean`: `add(site_adapter, weight)` per accepted update as it arrives, then
`mean()`. An `Aggregator` lives for the whole run: it opens a `RoundMean` per round and applies
its `ServerOptimizer` to the mean (plain replacement for FedAvg, FedProx and the robust rules; an
Adam step on the pseudo-gradient for FedAdam). FedProx needs nothing here: its proximal term is
applied by the sites, the server rule is FedAvg's.

Memory. The weighted mean (FedAvg, FedProx, FedAdam) folds updates into float32 accumulators
and drops them; full-rank updates wait in a batch of at most FOLD_BATCH (and FOLD_BATCH_BYTES)
to be folded in one pass. Peak memory is O(parameters), not O(sites x parameters). The
robust rules (trimmed mean, coordinate-wise median) need every site's value per coordinate: each
update is spilled, in the dtype it arrived in (float16 by default), to its own disk-backed numpy
memmap as it arrives; `mean()` then reads the spills back a few rows at a time into a
(sites x rows) float32 buffer of about one block in all (at least one row per site). Process
memory stays O(parameters + max(block, sites x row)); the spill files live in the page cache,
which the kernel can reclaim, and are deleted when the round ends.

Speed. The hot loops are compiled (`kernels`): float16 is widened by the CPU's own conversion
instruction, and the weighted mean folds a batch of full-rank updates into each block of
accumulators while that block sits in cache, so it moves little more than the updates' own bytes
through memory (bench/aggregation.py measures it against the machine's read bandwidth).

Mixed LoRA ranks. The global adapter has the largest rank r_max. A site with rank r < r_max
trains the truncation of the global adapter (`truncate_to_rank`): the first r rows of every
lora_A (r, in) and the first r columns of every lora_B (out, r). Aggregation treats each rank
slice k (row k of A, column k of B) on its own: it is averaged over the sites whose rank covers
it, with the weights renormalised over those sites only; a slice no site covers keeps the global
value. With equal ranks this is the ordinary weighted mean. The robust rules do the same per
coordinate (the trimmed mean cuts floor(beta * n) values each side of the n sites covering it).
`RoundMean.coverage()` reports how many sites covered each slice (the privacy layer needs it).

Weights. The weighted mean weighs by example count, as Flower's FedAvg does. The trimmed mean
and the median ignore weights, as Flower's FedTrimmedAvg and FedMedian do: a weight is a claim
by the site, and a poisoning site could claim any number of examples.

FedAdam follows Flower's FedAdam (eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-3) with the
pseudo-gradient g = global - mean, m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2 and
global <- global - eta_t m / (sqrt(v) + tau), where eta_t = eta sqrt(1 - b2^t) / (1 - b1^t) is
Adam's bias correction for server step t (Flower uses the round number + 1 there; a resumed run
here counts steps from its checkpointed `step`). m, v and the step survive checkpoints through
`state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .wire import AdapterState, rank_axis

# Elements per block: 64 Ki float32 = 256 KiB, small enough to stay in L2 cache.
BLOCK_ELEMENTS = 1 << 16
# Full-rank updates folded in one pass (see WeightedMean). Each pass reads and writes the float32
# accumulators once (8 bytes a parameter) besides the updates' own 2: 16 updates a pass move
# 40 bytes for 32 of input (measured: 85% of the read bandwidth of all cores; 8 a pass, 74%).
# What waits is bounded by a count and by bytes, never by the number of sites.
FOLD_BATCH = 16
FOLD_BATCH_BYTES = 1 << 30

STRATEGIES = ("fedavg", "fedprox", "fedadam", "trimmedmean", "median")


def _rank_axis_of(name: str, shape: tuple[int, ...]) -> int | None:
    return rank_axis(name) if len(shape) == 2 else None


def as_float32(adapter: Mapping[str, np.ndarray]) -> AdapterState:
    """Contiguous float32 copies (no copy for tensors that already are)."""
    return {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in adapter.items()}


def as_rows(values: np.ndarray) -> np.ndarray:
    """A 2-D view (rows, row length) of a tensor or a region of one, for blocking by rows."""
    if values.ndim == 2:
        return values
    return values.reshape(1, -1) if values.ndim < 2 else values.reshape(values.shape[0], -1)


def row_blocks(rows: int, row_length: int, block_elements: int) -> Iterable[slice]:
    """Slices of whole rows holding about `block_elements` elements (at least one row)."""
    step = max(1, block_elements // max(1, row_length))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _slice_count(name: str, shape: tuple[int, ...]) -> int:
    axis = _rank_axis_of(name, shape)
    return 1 if axis is None else shape[axis]


def along_rank_slices(name: str, shape: tuple[int, ...], per_slice: np.ndarray) -> np.ndarray:
    """A per-rank-slice vector shaped to broadcast over a tensor of `shape`."""
    axis = _rank_axis_of(name, shape)
    if axis is None:
        return per_slice.reshape((1,) * len(shape)) if shape else per_slice.reshape(())
    return per_slice[:, None] if axis == 0 else per_slice[None, :]


# ---- one round ----------------------------------------------------------------------------


class RoundMean(ABC):
    """The average of one round's accepted updates, fed one update at a time. Single use."""

    robust: bool = False

    def __init__(self, global_adapter: Mapping[str, np.ndarray]) -> None:
        if not global_adapter:
            raise ValueError("the global adapter holds no tensors")
        self.global_adapter = as_float32(global_adapter)
        self.sites = 0
        self._coverage = {
            n: np.zeros(_slice_count(n, v.shape), np.int64) for n, v in self.global_adapter.items()
        }
        # An update laid out exactly like the global adapter (the common case: a site at full
        # rank) is checked and counted once, not tensor by tensor.
        self._layout = tuple((n, tuple(v.shape)) for n, v in self.global_adapter.items())
        self._full_sites = 0

    def add(self, adapter: Mapping[str, np.ndarray], weight: float = 1.0) -> None:
        """Fold in one site's (validated) adapter with weight `weight` (its example count)."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight {weight!r} is not a positive finite number")
        full = getattr(adapter, "layout", None) == self._layout
        if full:
            self._add(adapter, float(weight), full=True)
            self._full_sites += 1
            self.sites += 1
            return
        missing = self.global_adapter.keys() - adapter.keys()
        if missing or adapter.keys() - self.global_adapter.keys():
            odd = sorted(missing or (adapter.keys() - self.global_adapter.keys()))[0]
            raise ValueError(
                f"tensor {odd!r} does not match the global adapter; validate updates first"
            )
        for name, values in adapter.items():
            want = self.global_adapter[name].shape
            too_big = values.ndim != len(want) or any(
                g > w for g, w in zip(values.shape, want, strict=True)
            )
            if too_big:
                raise ValueError(
                    f"tensor {name!r} has shape {values.shape}, larger than the global {want}"
                )
        self._add(adapter, float(weight), full=False)
        for name, values in adapter.items():
            self._coverage[name][: _slice_count(name, values.shape)] += 1
        self.sites += 1

    def coverage(self) -> dict[str, np.ndarray]:
        """Sites that covered each rank slice (one entry for tensors without a rank axis)."""
        return {n: c + self._full_sites for n, c in self._coverage.items()}

    @abstractmethod
    def _add(self, adapter: Mapping[str, np.ndarray], weight: float, *, full: bool) -> None:
        """Fold in a checked update; `full`: laid out exactly like the global adapter."""

    @abstractmethod
    def mean(self) -> AdapterState:
        """The round's average in float32; slices no site covered keep the global value."""

    def close(self) -> None:  # noqa: B027 - most rounds hold nothing to release
        """Release what the round holds (spill files); safe to call twice."""

    def __enter__(self) -> RoundMean:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AccumulatorPool:
    """Float32 accumulators reused from round to round. A fresh buffer costs a page fault per
    4 KiB the first time it is written (about 0.1 s for 40M parameters, a tenth of folding 100
    sites); a reused one costs none. A buffer is handed out again only when nothing refers to
    it any more: the previous round's mean, views of its buffer, may still be the global
    adapter (or the server optimiser's input) while this round accumulates."""

    def __init__(self, keep: int = 3) -> None:
        self._kept: list[np.ndarray] = []
        self._keep = keep

    def take(self, size: int) -> np.ndarray:
        for buffer in self._kept:
            # References: the list, this loop's variable and getrefcount's argument; any view
            # of the buffer (a tensor of an earlier mean) adds one through its .base.
            if buffer.size == size and sys.getrefcount(buffer) <= 3:
                return buffer
        buffer = np.empty(size, np.float32)
        self._kept = [*self._kept[-(self._keep - 1):], buffer] if self._keep > 1 else [buffer]
        return buffer


class WeightedMean(RoundMean):
    """Example-weighted mean (FedAvg, FedProx, FedAdam), per rank slice, in float32.

    The accumulators are one flat float32 array in the global adapter's order. An update that
    arrived packed in that same order and at full rank is one flat array too: it waits in a
    batch of up to `batch` updates (at most `batch_bytes`), and the batch is folded in one pass
    (`kernels.fold`). Other updates (lower ranks, other orders, bfloat16) fold tensor by tensor.
    """

    def __init__(
        self,
        global_adapter: Mapping[str, np.ndarray],
        *,
        batch: int = FOLD_BATCH,
        batch_bytes: int = FOLD_BATCH_BYTES,
        buffers: AccumulatorPool | None = None,
    ) -> None:
        super().__init__(global_adapter)
        if batch < 1:
            raise ValueError(f"batch {batch} must be at least 1")
        self._names = list(self.global_adapter)
        # Not zeroed here: the first batch overwrites it block by block (one pass fewer); an
        # update folded tensor by tensor zeroes it first.
        size = sum(v.size for v in self.global_adapter.values())
        self._flat = buffers.take(size) if buffers else np.empty(size, np.float32)
        self._written = False
        self._sums: dict[str, np.ndarray] = {}
        offset = 0
        for name, values in self.global_adapter.items():
            self._sums[name] = self._flat[offset: offset + values.size].reshape(values.shape)
            offset += values.size
        self._weights = {n: np.zeros(c.shape, np.float64) for n, c in self._coverage.items()}
        self._full_weight = 0.0  # of updates at full rank, which cover every slice
        self._partial = False  # some update covered only some slices
        self._batch, self._batch_bytes = batch, batch_bytes
        self._pending: list[np.ndarray] = []
        self._pending_weights: list[float] = []

    def _add(self, adapter: Mapping[str, np.ndarray], weight: float, *, full: bool) -> None:
        flat = getattr(adapter, "flat", None) if full else None
        if flat is not None:
            # A full batch is folded when the next update arrives, so mean() always has one
            # to fold and can divide in the same pass.
            held = sum(p.nbytes for p in self._pending)
            if len(self._pending) >= self._batch or held + flat.nbytes > self._batch_bytes:
                self._fold_pending()
            self._pending.append(flat)
            self._pending_weights.append(weight)
        else:
            self._zero_once()
            for name, values in adapter.items():
                region = self._sums[name][tuple(slice(0, d) for d in values.shape)]
                kernels.fold_rows(as_rows(region), as_rows(values), weight)
        if full:
            self._full_weight += weight
            return
        self._partial = True
        for name, values in adapter.items():
            self._weights[name][: _slice_count(name, values.shape)] += weight

    def _zero_once(self) -> None:
        if not self._written:
            self._flat.fill(0.0)
            self._written = True

    def _fold_pending(self, scale: float = 1.0) -> None:
        if self._pending:
            kernels.fold(self._flat, self._pending, self._pending_weights,
                         overwrite=not self._written, scale=scale)
            self._written = True
            self._pending, self._pending_weights = [], []

    def mean(self) -> AdapterState:
        if self.sites == 0:
            raise ValueError("no site's update was added to this round")
        if not self._partial and self._pending:
            # Every update covered every slice: one weight for all, divided in the last fold.
            self._fold_pending(scale=1.0 / self._full_weight)
            means, self._sums = self._sums, {}
            return means
        self._fold_pending()
        self._zero_once()
        for name, total in self._sums.items():
            weights = self._weights[name] + self._full_weight
            inverse = np.zeros(weights.shape, np.float32)
            np.divide(1.0, weights, out=inverse, where=weights > 0, casting="unsafe")
            np.multiply(total, along_rank_slices(name, total.shape, inverse), out=total)
            uncovered = weights == 0
            if uncovered.any():
                np.copyto(
                    total,
                    self.global_adapter[name],
                    where=along_rank_slices(name, total.shape, uncovered),
                )
        means, self._sums = self._sums, {}
        return means

    def close(self) -> None:
        self._pending, self._pending_weights = [], []


@dataclass
class _SpilledSite:
    path: Path
    dtype: np.dtype
    size: int
    layout: dict[str, tuple[int, tuple[int, ...]]]  # name -> (offset, shape)
    values: np.ndarray | None = None  # read-only memmap while the round reduces


class _SpilledRound(RoundMean):
    """Base of the robust rules: spill each update to disk, reduce block by block."""

    robust = True

    def __init__(
        self,
        global_adapter: Mapping[str, np.ndarray],
        *,
        spill_dir: str | Path | None = None,
        block_elements: int = BLOCK_ELEMENTS,
    ) -> None:
        super().__init__(global_adapter)
        self._dir = Path(tempfile.mkdtemp(prefix="pollinate-spill-", dir=spill_dir))
        # Spill files must not outlive a round whose caller forgot close().
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._spilled: list[_SpilledSite] = []
        self._block = block_elements

    @property
    def spill_dir(self) -> Path:
        return self._dir

    def _add(self, adapter: Mapping[str, np.ndarray], weight: float, *, full: bool) -> None:
        # Keep float16 as float16 on disk (half the bytes); anything else spills as float32.
        dtype = np.dtype(
            np.float16 if all(v.dtype == np.float16 for v in adapter.values()) else np.float32
        )
        size = sum(int(v.size) for v in adapter.values())
        site = _SpilledSite(self._dir / f"site-{len(self._spilled):04d}.bin", dtype, size, {})
        spill = np.memmap(site.path, dtype=dtype, mode="w+", shape=(size,))
        offset = 0
        for name, values in adapter.items():
            spill[offset : offset + values.size] = values.reshape(-1)
            site.layout[name] = (offset, tuple(values.shape))
            offset += values.size
        spill.flush()
        del spill  # unmapped: the update now costs disk (page cache), not process memory
        self._spilled.append(site)

    @abstractmethod
    def _reduce(self, block: np.ndarray, out: np.ndarray) -> None:
        """Reduce (sites, rows, cols) `block` over sites into `out`; all values present."""

    @abstractmethod
    def _reduce_partial(self, block: np.ndarray, out: np.ndarray) -> None:
        """As `_reduce`, where NaN marks a coordinate a site's rank does not cover; leave NaN
        in `out` where no site covers the coordinate."""

    def mean(self) -> AdapterState:
        if self.sites == 0:
            raise ValueError("no site's update was added to this round")
        for site in self._spilled:
            site.values = np.memmap(site.path, dtype=site.dtype, mode="r", shape=(site.size,))
        try:
            return {name: self._reduce_tensor(name, g) for name, g in self.global_adapter.items()}
        finally:
            self.close()

    def _reduce_tensor(self, name: str, global_values: np.ndarray) -> np.ndarray:
        result = np.empty(global_values.shape, np.float32)
        out_rows = as_rows(result)
        rows, row_length = out_rows.shape
        # The (sites x rows x row) buffer holds about one block in all, whatever the sites.
        per_site = max(1, self._block // len(self._spilled))
        step = max(1, per_site // max(1, row_length))
        buffer = np.empty((len(self._spilled), min(step, rows), row_length), np.float32)
        site_rows = []
        for site in self._spilled:
            offset, shape = site.layout[name]
            assert site.values is not None
            flat = site.values[offset : offset + math.prod(shape)]
            site_rows.append(as_rows(flat.reshape(shape)))
        for block_rows in row_blocks(rows, row_length, per_site):
            height = block_rows.stop - block_rows.start
            block = buffer[:, :height]
            partial = False
            for s, values in enumerate(site_rows):
                covered_rows = max(0, min(values.shape[0], block_rows.stop) - block_rows.start)
                if covered_rows == height and values.shape[1] == row_length:
                    kernels.to_float32(values[block_rows], out=block[s])
                    continue
                partial = True
                block[s].fill(np.nan)
                if covered_rows:
                    kernels.to_float32(
                        values[block_rows.start : block_rows.start + covered_rows],
                        out=block[s, :covered_rows, : values.shape[1]],
                    )
            out = out_rows[block_rows]
            if partial:
                self._reduce_partial(block, out)
                uncovered = np.isnan(out)
                if uncovered.any():
                    np.copyto(out, as_rows(global_values)[block_rows], where=uncovered)
            else:
                self._reduce(block, out)
        return result

    def close(self) -> None:
        for site in self._spilled:
            site.values = None
        self._cleanup()


def _sort_sites(block: np.ndarray) -> None:
    """Sort (sites, ...) `block` along the site axis in place; no NaN allowed.

    For a few sites an odd-even transposition network of np.minimum / np.maximum over whole
    rows is ~4x faster than np.sort along a short strided axis; beyond 16 sites sort wins.
    """
    sites = block.shape[0]
    if sites > 16:
        block.sort(axis=0)
        return
    low = np.empty(block.shape[1:], block.dtype)
    for phase in range(sites):
        for i in range(phase % 2, sites - 1, 2):
            first, second = block[i], block[i + 1]
            np.minimum(first, second, out=low)
            np.maximum(first, second, out=second)
            first[...] = low


def _check_trim_beta(beta: float) -> None:
    if not 0 <= beta < 0.5:
        raise ValueError(f"trimmed mean beta {beta!r} is outside [0, 0.5)")


class TrimmedMean(_SpilledRound):
    """Coordinate-wise trimmed mean: drop floor(beta * n) values at each end, average the rest."""

    def __init__(
        self,
        global_adapter: Mapping[str, np.ndarray],
        *,
        beta: float = 0.2,
        spill_dir: str | Path | None = None,
        block_elements: int = BLOCK_ELEMENTS,
    ) -> None:
        _check_trim_beta(beta)
        super().__init__(global_adapter, spill_dir=spill_dir, block_elements=block_elements)
        self.beta = beta

    def _reduce(self, block: np.ndarray, out: np.ndarray) -> None:
        n = block.shape[0]
        cut = int(self.beta * n)
        if cut:
            _sort_sites(block)
            block = block[cut : n - cut]
        np.mean(block, axis=0, out=out)

    def _reduce_partial(self, block: np.ndarray, out: np.ndarray) -> None:
        present = np.count_nonzero(~np.isnan(block), axis=0)
        block.sort(axis=0)  # NaN sorts last, so each coordinate's values come first
        np.nan_to_num(block, copy=False, nan=0.0)
        cut = np.floor(self.beta * present).astype(np.int64)
        prefix = np.concatenate([np.zeros((1, *block.shape[1:]), np.float64),
                                 np.cumsum(block, axis=0, dtype=np.float64)])
        upper = np.take_along_axis(prefix, (present - cut)[None], axis=0)[0]
        lower = np.take_along_axis(prefix, cut[None], axis=0)[0]
        kept = present - 2 * cut
        out.fill(np.nan)
        np.divide(upper - lower, kept, out=out, where=kept > 0, casting="unsafe")


class CoordinateMedian(_SpilledRound):
    """Coordinate-wise median over the sites (the mean of the middle two for an even count).

    Sorting the few site values of each coordinate in place beats np.median here, which
    allocated ~160 bytes per coordinate for two sites in numpy 2.4.
    """

    def _reduce(self, block: np.ndarray, out: np.ndarray) -> None:
        n = block.shape[0]
        _sort_sites(block)
        if n % 2:
            out[...] = block[n // 2]
        else:
            np.add(block[n // 2 - 1], block[n // 2], out=out)
            np.multiply(out, np.float32(0.5), out=out)

    def _reduce_partial(self, block: np.ndarray, out: np.ndarray) -> None:
        present = np.count_nonzero(~np.isnan(block), axis=0)
        block.sort(axis=0)  # NaN sorts last
        low = np.take_along_axis(block, ((np.maximum(present, 1) - 1) // 2)[None], axis=0)[0]
        high = np.take_along_axis(block, (present // 2)[None], axis=0)[0]
        np.add(low, high, out=out)
        np.multiply(out, np.float32(0.5), out=out)
        out[present == 0] = np.nan


# ---- across rounds ------------------------------------------------------------------------


class ServerOptimizer:
    """FedAvg's server rule: the new global adapter is the round's mean."""

    def step(self, global_adapter: AdapterState, mean: AdapterState) -> AdapterState:
        return mean

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(
                f"this server rule keeps no state but the checkpoint holds {sorted(state)[:3]}"
            )


class FedAdam(ServerOptimizer):
    """Adam on the server, on the pseudo-gradient global - mean (see the module docstring)."""

    def __init__(
        self,
        learning_rate: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        *,
        block_elements: int = BLOCK_ELEMENTS,
    ) -> None:
        if not learning_rate > 0:
            raise ValueError(f"FedAdam learning rate {learning_rate!r} must be > 0")
        for field, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0 <= value < 1:
                raise ValueError(f"FedAdam {field} {value!r} is outside [0, 1)")
        if not tau > 0:
            raise ValueError(f"FedAdam tau {tau!r} must be > 0")
        self.learning_rate, self.beta_1, self.beta_2, self.tau = learning_rate, beta_1, beta_2, tau
        self.steps = 0
        self.m: AdapterState = {}
        self.v: AdapterState = {}
        self._block = block_elements
        self._scratch = np.empty((2, block_elements), np.float32)

    def step(self, global_adapter: AdapterState, mean: AdapterState) -> AdapterState:
        self.steps += 1
        t = self.steps
        eta = self.learning_rate * math.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)
        b1, b2 = np.float32(self.beta_1), np.float32(self.beta_2)
        c1, c2 = np.float32(1 - self.beta_1), np.float32(1 - self.beta_2)
        eta32, tau32 = np.float32(eta), np.float32(self.tau)
        for name, x in mean.items():
            g = np.ascontiguousarray(global_adapter[name], dtype=np.float32).reshape(-1)
            m = self.m.setdefault(name, np.zeros(x.shape, np.float32))
            v = self.v.setdefault(name, np.zeros(x.shape, np.float32))
            if m.shape != x.shape:
                raise ValueError(
                    f"tensor {name!r} has shape {x.shape} but FedAdam's state has {m.shape}"
                )
            xf, mf, vf = x.reshape(-1), m.reshape(-1), v.reshape(-1)
            for start in range(0, xf.size, self._block):
                span = slice(start, min(xf.size, start + self._block))
                grad = self._scratch[0, : span.stop - start]
                tmp = self._scratch[1, : span.stop - start]
                gb, xb, mb, vb = g[span], xf[span], mf[span], vf[span]
                np.subtract(gb, xb, out=grad)  # pseudo-gradient
                np.multiply(mb, b1, out=mb)
                np.multiply(grad, c1, out=tmp)
                np.add(mb, tmp, out=mb)
                np.multiply(grad, grad, out=tmp)
                np.multiply(tmp, c2, out=tmp)
                np.multiply(vb, b2, out=vb)
                np.add(vb, tmp, out=vb)
                np.sqrt(vb, out=tmp)
                np.add(tmp, tau32, out=tmp)
                np.divide(mb, tmp, out=tmp)
                np.multiply(tmp, eta32, out=tmp)
                np.subtract(gb, tmp, out=xb)  # the mean's buffer becomes the new global
        return mean

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"step": np.array([self.steps], np.int64)}
        state.update({f"m/{n}": a for n, a in self.m.items()})
        state.update({f"v/{n}": a for n, a in self.v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if "step" not in state:
            raise ValueError("FedAdam state has no 'step' entry")
        m, v = {}, {}
        for key, values in state.items():
            if key == "step":
                continue
            kind, _, name = key.partition("/")
            if kind not in ("m", "v") or not name:
                raise ValueError(
                    f"FedAdam state entry {key!r} is not 'step', 'm/<tensor>' or 'v/<tensor>'"
                )
            (m if kind == "m" else v)[name] = np.array(values, dtype=np.float32)
        if m.keys() != v.keys():
            odd = sorted(m.keys() ^ v.keys())[:3]
            raise ValueError(f"FedAdam state has m without v (or v without m) for {odd}")
        self.steps = int(np.asarray(state["step"]).reshape(-1)[0])
        self.m, self.v = m, v


class Aggregator:
    """One run's aggregation: a fresh RoundMean per round, and the server rule across rounds."""

    def __init__(
        self,
        new_round: Callable[[Mapping[str, np.ndarray]], RoundMean],
        optimizer: ServerOptimizer | None = None,
        *,
        name: str = "custom",
    ) -> None:
        self._new_round = new_round
        self.optimizer = optimizer or ServerOptimizer()
        self.name = name

    def begin_round(self, global_adapter: Mapping[str, np.ndarray]) -> RoundMean:
        return self._new_round(global_adapter)

    def finish_round(self, round_mean: RoundMean) -> AdapterState:
        """The next global adapter. A round without accepted updates leaves it unchanged (and
        does not advance the server optimiser)."""
        try:
            if round_mean.sites == 0:
                return {n: v.copy() for n, v in round_mean.global_adapter.items()}
            mean = round_mean.mean()
        finally:
            round_mean.close()
        return self.optimizer.step(round_mean.global_adapter, mean)

    def aggregate(
        self,
        global_adapter: Mapping[str, np.ndarray],
        updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
    ) -> AdapterState:
        """One whole round from (adapter, example count) pairs, consumed one at a time."""
        round_mean = self.begin_round(global_adapter)
        try:
            for adapter, weight in updates:
                round_mean.add(adapter, weight)
        except BaseException:
            round_mean.close()
            raise
        return self.finish_round(round_mean)

    @property
    def robust(self) -> bool:
        return self.name in ("trimmedmean", "median")

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.optimizer.load_state_dict(state)


def make_aggregator(
    strategy: str,
    *,
    beta: float = 0.2,
    server_learning_rate: float = 0.1,
    beta_1: float = 0.9,
    beta_2: float = 0.99,
    tau: float = 1e-3,
    spill_dir: str | Path | None = None,
) -> Aggregator:
    """The aggregator for a TrainingRound's `spec.strategy.name`."""
    if strategy in ("fedavg", "fedprox", "fedadam"):
        buffers = AccumulatorPool()
        optimizer = (FedAdam(server_learning_rate, beta_1, beta_2, tau)
                     if strategy == "fedadam" else None)
        return Aggregator(lambda g: WeightedMean(g, buffers=buffers), optimizer, name=strategy)
    if strategy == "trimmedmean":
        _check_trim_beta(beta)  # at configuration time, not in the first round
        return Aggregator(lambda g: TrimmedMean(g, beta=beta, spill_dir=spill_dir), name=strategy)
    if strategy == "median":
        return Aggregator(lambda g: CoordinateMedian(g, spill_dir=spill_dir), name=strategy)
    raise ValueError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
