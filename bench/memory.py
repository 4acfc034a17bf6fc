"""The machine's memory as a physical limit: streaming bandwidth, and the peak resident set of a
stretch of code.

Peak memory is the kernel's own high-water mark (VmHWM in /proc/self/status), reset just before
the measured code by writing 5 to /proc/self/clear_refs (Linux >= 4.0). It is the resident set:
numpy buffers, Python objects and file pages mapped into the process alike. A sampler thread
reads RssAnon every few milliseconds beside it, so pages the kernel could reclaim (a memory-
mapped spill file) can be told from memory that cannot be given back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from common import best_of
from numba import njit, prange

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Bandwidth:
    """Best-of-several streaming rates over arrays far larger than any cache, in GB/s."""

    read: float        # bytes read per second by one core (a reduction doing almost no arithmetic)
    copy: float        # bytes copied per second, the convention (STREAM's would be 2x)
    read_write: float  # bytes read plus bytes written per second while copying
    array_mib: int
    repeats: int
    read_all_cores: float = 0.0  # the same reduction split over every core (`threads`)
    threads: int = 1


@njit(parallel=True, nogil=True, boundscheck=False)
def _parallel_or(words):  # type: ignore[no-untyped-def]
    block = 1 << 13
    blocks = (words.size + block - 1) // block
    partial = np.zeros(blocks, np.uint64)
    for b in prange(blocks):
        lo, hi = b * block, min(words.size, (b + 1) * block)
        acc = np.uint64(0)
        for i in range(lo, hi):
            acc |= words[i]
        partial[b] = acc
    return partial


def measure_bandwidth(array_mib: int = 512, repeats: int = 5) -> Bandwidth:
    """Measure with numpy itself on one core, the rate numpy code could reach at best, and with a
    compiled reduction on every core, the limit for Pollinate's compiled (multi-core) loops."""
    count = array_mib * (1 << 20) // 4
    src = np.ones(count, np.float32)  # touched: no page faults inside the timing
    dst = np.zeros_like(src)
    as_bits = src.view(np.uint32)
    copy = best_of(lambda: np.copyto(dst, src), repeats)
    # bitwise_or over integers: one cheap SIMD op per element, so it runs at read speed.
    read = best_of(lambda: np.bitwise_or.reduce(as_bits), repeats)
    words = src.view(np.uint64)
    _parallel_or(words[:1024])  # compile outside the timing
    read_all = best_of(lambda: _parallel_or(words), repeats)
    nbytes = src.nbytes
    return Bandwidth(read=nbytes / read / 1e9, copy=nbytes / copy / 1e9,
                     read_write=2 * nbytes / copy / 1e9, array_mib=array_mib, repeats=repeats,
                     read_all_cores=nbytes / read_all / 1e9, threads=numba.get_num_threads())


def _status_kib(*fields: str) -> dict[str, int]:
    values = {}
    for line in _STATUS.read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[key] = int(rest.split()[0])
    return values


def rss_mib() -> float:
    return _status_kib("VmRSS")["VmRSS"] / 1024


class PeakMemory:
    """Peak resident memory of a `with` block, in MiB above the resident set at its start."""

    method = "kernel VmHWM reset through /proc/self/clear_refs, RssAnon sampled every 5 ms"

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start_mib = 0.0
        self.start_anon_mib = 0.0
        self.peak_mib = 0.0
        self.peak_anon_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            anon = _status_kib("RssAnon")["RssAnon"] / 1024
            self.peak_anon_mib = max(self.peak_anon_mib, anon)

    def __enter__(self) -> PeakMemory:
        status = _status_kib("VmRSS", "RssAnon")
        self.start_mib = status["VmRSS"] / 1024
        self.start_anon_mib = self.peak_anon_mib = status["RssAnon"] / 1024
        _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS now
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        status = _status_kib("VmHWM", "RssAnon")
        self.peak_mib = status["VmHWM"] / 1024
        self.peak_anon_mib = max(self.peak_anon_mib, status["RssAnon"] / 1024)

    @property
    def added_mib(self) -> float:
        """Peak resident set above the start: everything, file pages included."""
        return max(0.0, self.peak_mib - self.start_mib)

    @property
    def added_anon_mib(self) -> float:
        """Peak anonymous memory above the start (sampled): what the kernel cannot reclaim."""
        return max(0.0, self.peak_anon_mib - self.start_anon_mib)

