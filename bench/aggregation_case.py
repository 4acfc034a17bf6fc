"""One aggregation case, measured in a fresh process so that one case's heap cannot inflate the
next one's peak memory: `python bench/aggregation_case.py '<CaseSpec as JSON>'` prints one
`RESULT {...}` line.

Both systems get the same kind of input: each site's fp16 update encoded by Pollinate's own
`wire.to_record` into a Flower ArrayRecord, exactly the bytes a reply carries. What each system
must hold differs by design, and the case builds it that way:
- Flower's strategies aggregate a list of every reply of the round (`Strategy.start` collects
  them all first), so all `sites` records are built, distinct in memory, before the timing.
- Pollinate folds replies into its accumulators in batches of at most FOLD_BATCH (and
  FOLD_BATCH_BYTES) and drops them, so it needs one batch of records at a time. The case cycles
  through a pool of distinct records of at least `pool_mib` (far beyond the caches, so no
  update is read from cache) instead of building them all.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from memory import PeakMemory, rss_mib

RESULT_PREFIX = "RESULT "
WEIGHTED = "fedavg"
ROBUST = ("trimmedmean", "median")


@dataclass(frozen=True)
class AdapterShape:
    """LoRA pairs of lora_A (rank, hidden) and lora_B (hidden, rank), like q/k/v/o of a model
    with `hidden` = 4096 (a 7B model): 305 pairs at rank 16 are 40M parameters."""

    pairs: int
    hidden: int
    rank: int = 16

    @classmethod
    def with_about(cls, params: int, hidden: int, rank: int = 16) -> AdapterShape:
        return cls(max(1, round(params / (2 * rank * hidden))), hidden, rank)

    @property
    def params(self) -> int:
        return self.pairs * 2 * self.rank * self.hidden

    def tensors(self) -> list[tuple[str, tuple[int, int]]]:
        out = []
        for i in range(self.pairs):
            module = f"base_model.model.model.layers.{i // 4}.self_attn.{'qkvo'[i % 4]}_proj"
            out.append((f"{module}.lora_A.weight", (self.rank, self.hidden)))
            out.append((f"{module}.lora_B.weight", (self.hidden, self.rank)))
        return out


@dataclass(frozen=True)
class CaseSpec:
    system: str  # "pollinate" or "flower"
    strategy: str  # "fedavg", "trimmedmean" or "median"
    sites: int
    shape: AdapterShape
    beta: float = 0.2
    pool_mib: int = 1024
    profile: bool = False
    repeats: int = 1  # timing is the best of these; memory is measured on the first

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CaseSpec:
        raw = json.loads(text)
        return cls(**{**raw, "shape": AdapterShape(**raw["shape"])})

    @property
    def update_bytes(self) -> int:
        return self.shape.params * 2

    @property
    def pool_size(self) -> int:
        """Distinct records Pollinate's input cycles through (see the module docstring)."""
        return min(self.sites, max(2, math.ceil(self.pool_mib * (1 << 20) / self.update_bytes)))


def example_counts(sites: int) -> list[int]:
    """Unequal example counts, so the weighted mean is really weighted."""
    return [100 + 7 * s for s in range(sites)]


# ---- site updates ---------------------------------------------------------------------------

_BASE_VALUES = 1 << 20


class UpdateSource:
    """Deterministic, distinct, finite fp16 updates for any site, made at memory speed: a
    window of one block of N(0, 0.01) halves, XOR-ed with a per-site mask on mantissa bits only
    (so sign and exponent, hence finiteness, are kept)."""

    def __init__(self, shape: AdapterShape) -> None:
        longest = max(math.prod(dims) for _, dims in shape.tensors())
        rng = np.random.default_rng(2026)
        self.shape = shape
        self._bits = (rng.standard_normal(_BASE_VALUES + longest, np.float32) * 0.01).astype(
            np.float16).view(np.uint16)

    def tensor(self, site: int, index: int) -> np.ndarray:
        _, dims = self.shape.tensors()[index]
        return self._tensor(site, index, dims)

    def _tensor(self, site: int, index: int, dims: tuple[int, int]) -> np.ndarray:
        mask = np.uint16(1 + (site * 2654435761) % 1023)
        offset = (site * 7919 + index * 104729) % _BASE_VALUES
        window = self._bits[offset: offset + math.prod(dims)]
        return np.bitwise_xor(window, mask).view(np.float16).reshape(dims)

    def adapter(self, site: int) -> dict[str, np.ndarray]:
        return {name: self._tensor(site, i, dims)
                for i, (name, dims) in enumerate(self.shape.tensors())}


def reference_first_tensor(spec: CaseSpec, source: UpdateSource,
                           site_values: Callable[[int], int]) -> np.ndarray:
    """The exact (float64) result for the first tensor, to compare each system against."""
    stacked = np.stack([source.tensor(site_values(s), 0).astype(np.float64)
                        for s in range(spec.sites)])
    if spec.strategy == WEIGHTED:
        weights = np.array(example_counts(spec.sites), np.float64)
        return np.tensordot(weights / weights.sum(), stacked, axes=1)
    if spec.strategy == "median":
        return np.median(stacked, axis=0)
    cut = int(spec.beta * spec.sites)
    return np.sort(stacked, axis=0)[cut: spec.sites - cut].mean(axis=0)


def relative_error(result: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(result.astype(np.float64) - reference)) / scale)


# ---- the two systems ------------------------------------------------------------------------


def held_by_design(spec: CaseSpec) -> int:
    """Updates a Pollinate weighted-mean round holds at once: one batch (robust rules: one)."""
    from pollinate_runtime.aggregation import FOLD_BATCH, FOLD_BATCH_BYTES

    if spec.strategy != WEIGHTED:
        return 1
    by_bytes = math.ceil(FOLD_BATCH_BYTES / spec.update_bytes)
    return min(spec.sites, FOLD_BATCH, by_bytes)


def run_pollinate(spec: CaseSpec, source: UpdateSource) -> dict[str, Any]:
    from pollinate_runtime.aggregation import make_aggregator
    from pollinate_runtime.wire import from_record, to_record

    pool_size = spec.pool_size
    pool = [to_record(source.adapter(s), "float16") for s in range(pool_size)]
    weights = example_counts(spec.sites)
    global_adapter = {name: np.zeros(dims, np.float32) for name, dims in spec.shape.tensors()}
    aggregator = make_aggregator(spec.strategy, beta=spec.beta)
    warm_up(spec.strategy)

    def aggregate() -> tuple[dict[str, np.ndarray], float, float]:
        start = time.perf_counter()
        round_mean = aggregator.begin_round(global_adapter)
        for s in range(spec.sites):
            round_mean.add(from_record(pool[s % pool_size]), weight=weights[s])
        added = time.perf_counter()
        result = aggregator.finish_round(round_mean)
        return result, added - start, time.perf_counter() - added

    # The run's first round, with its memory: its accumulators are fresh pages.
    with PeakMemory() as memory:
        result, add_first, finish_first = aggregate()
    del result
    # Later rounds reuse the accumulators (AccumulatorPool): the steady state is timed.
    add_seconds = finish_seconds = math.inf
    for _ in range(max(1, spec.repeats)):
        result, add_again, finish_again = aggregate()
        if add_again + finish_again < add_seconds + finish_seconds:
            add_seconds, finish_seconds = add_again, finish_again

    first_name = spec.shape.tensors()[0][0]
    reference = reference_first_tensor(spec, source, lambda s: s % pool_size)
    out = {
        "seconds": add_seconds + finish_seconds,
        "add_seconds": add_seconds,
        "finish_seconds": finish_seconds,
        "first_round_seconds": add_first + finish_first,
        "pool_records": pool_size,
        # Replies are decoded in place (views) and dropped once folded: a batch is held at most.
        "held_updates": held_by_design(spec),
        "held_updates_mib": held_by_design(spec) * spec.update_bytes / (1 << 20),
        "work_mib": memory.added_mib,
        "work_anon_mib": memory.added_anon_mib,
        "rel_error": relative_error(result[first_name], reference),
    }
    if spec.profile and spec.strategy == WEIGHTED:
        out["profile"] = profile_weighted_mean(pool[: min(pool_size, 16)], spec)
    return out


def warm_up(strategy: str) -> None:
    """One small round first, so that loading the compiled loops is not timed."""
    from pollinate_runtime.aggregation import make_aggregator
    from pollinate_runtime.wire import from_record, to_record

    tiny = {"a.lora_A.weight": np.ones((2, 8), np.float32), "a.lora_B.weight": np.ones((8, 2), np.float32)}
    make_aggregator(strategy).aggregate(tiny, [(from_record(to_record(tiny)), 1.0)] * 5)


def run_flower(spec: CaseSpec, source: UpdateSource) -> dict[str, Any]:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.WARNING)  # one INFO line per round otherwise
    # Messages take their run and node from the process's task identity, as in a ServerApp.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    peers = {"fedavg": FedAvg, "median": FedMedian}
    strategy = peers[spec.strategy]() if spec.strategy in peers else FedTrimmedAvg(beta=spec.beta)
    instruction = Message(RecordDict(), dst_node_id=2, message_type="train")
    weights = example_counts(spec.sites)

    def replies() -> list[Message]:
        return [
            # Flower's strategies average ArrayRecords of one Array per tensor.
            Message(RecordDict({"arrays": ArrayRecord({n: Array(v.astype(np.float16))
                                                       for n, v in source.adapter(s).items()}),
                                "metrics": MetricRecord({"num-examples": weights[s]})}),
                    reply_to=instruction)
            for s in range(spec.sites)
        ]

    before = rss_mib()
    received = replies()
    held = rss_mib() - before
    with PeakMemory() as memory:
        start = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, received)
        seconds = time.perf_counter() - start
    for _ in range(spec.repeats - 1):
        if spec.strategy != WEIGHTED:  # FedMedian and FedTrimmedAvg pop the arrays they read
            del received
            received = replies()
        start = time.perf_counter()
        strategy.aggregate_train(1, received)
        seconds = min(seconds, time.perf_counter() - start)
    assert arrays is not None
    first_name = spec.shape.tensors()[0][0]
    reference = reference_first_tensor(spec, source, lambda s: s)
    return {
        "seconds": seconds,
        "held_updates_mib": held,  # every reply of the round, measured while building them
        "work_mib": memory.added_mib,
        "work_anon_mib": memory.added_anon_mib,
        "rel_error": relative_error(arrays[first_name].numpy(), reference),
        "result_dtype": str(arrays[first_name].dtype),
    }


# ---- where Pollinate's weighted mean spends its time ----------------------------------------


def profile_weighted_mean(records: list, spec: CaseSpec) -> dict[str, float]:
    """Each stage a reply goes through on the server, timed on its own in ns per parameter:
    decoding the record (views), validating it (the norm and finiteness pass), and folding the
    flat updates into accumulators a batch at a time."""
    from common import best_of
    from pollinate_runtime import kernels
    from pollinate_runtime.aggregation import FOLD_BATCH
    from pollinate_runtime.wire import AdapterSpec, from_record, validate_update

    n = len(records)
    per_param = 1e9 / (n * spec.shape.params)
    flats = [from_record(r).flat for r in records]
    acc = np.zeros(spec.shape.params, np.float32)
    batch = min(FOLD_BATCH, held_by_design(spec)) or 1

    def fold_all() -> None:
        for start in range(0, n, batch):
            kernels.fold(acc, flats[start: start + batch], [1.0] * len(flats[start: start + batch]))

    def fold_one_at_a_time() -> None:
        for flat in flats:
            kernels.fold(acc, [flat], [1.0])

    template = {name: np.zeros(dims, np.float32) for name, dims in spec.shape.tensors()}
    adapter_spec = AdapterSpec.from_template(template)
    return {
        "sites_profiled": n,
        "tensors_per_update": len(template),
        "batch": batch,
        "decode_ns": best_of(lambda: [from_record(r) for r in records], 2) * per_param,
        "validate_ns": best_of(lambda: [validate_update(r, adapter_spec, max_norm=math.inf)
                                        for r in records], 2) * per_param,
        "fold_ns": best_of(fold_all, 2) * per_param,
        "fold_unbatched_ns": best_of(fold_one_at_a_time, 2) * per_param,
    }


def run_case(spec: CaseSpec) -> dict[str, Any]:
    import os

    load = [round(x, 2) for x in os.getloadavg()]
    source = UpdateSource(spec.shape)
    run = run_pollinate if spec.system == "pollinate" else run_flower
    return {**run(spec, source), "load_average": load}


if __name__ == "__main__":
    case = CaseSpec.from_json(sys.argv[1])
    print(RESULT_PREFIX + json.dumps(run_case(case)), flush=True)
