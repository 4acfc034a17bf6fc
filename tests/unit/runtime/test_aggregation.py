"""Streaming aggregation against naive numpy references: weighted mean, FedAdam, trimmed mean,
median, with equal and mixed LoRA ranks, and memory that does not grow with the site count."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from pollinate_runtime.aggregation import (
    FOLD_BATCH,
    STRATEGIES,
    CoordinateMedian,
    FedAdam,
    TrimmedMean,
    WeightedMean,
    make_aggregator,
)
from pollinate_runtime.wire import from_record, to_record, truncate_to_rank

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def site_updates(make_adapter, sites: int, *, rank: int = 4, dtype=np.float16, **kw):
    return [make_adapter(rank=rank, dtype=dtype, seed=100 + s, **kw) for s in range(sites)]


def stack(updates, name):
    return np.stack([u[name].astype(np.float64) for u in updates])


def padded(updates, name, shape):
    """(sites, *shape) with NaN where a site's rank does not reach."""
    out = np.full((len(updates), *shape), np.nan)
    for s, u in enumerate(updates):
        out[s][tuple(slice(0, d) for d in u[name].shape)] = u[name]
    return out


# ---- helpers ------------------------------------------------------------------------------


def test_truncate_to_rank_keeps_first_rows_of_a_and_first_columns_of_b(make_adapter):
    adapter = make_adapter(rank=8)
    low = truncate_to_rank(adapter, 3)
    np.testing.assert_array_equal(low[A], adapter[A][:3])
    np.testing.assert_array_equal(low[B], adapter[B][:, :3])
    assert low[B].flags.c_contiguous


def test_truncating_beyond_a_tensors_rank_is_refused(make_adapter):
    with pytest.raises(ValueError, match=r"lora_A.*rank 4.*rank 6"):
        truncate_to_rank(make_adapter(rank=4), 6)


# ---- weighted mean ------------------------------------------------------------------------


def test_weighted_mean_matches_naive_numpy_reference(make_adapter):
    global_adapter = make_adapter(seed=1)
    updates = site_updates(make_adapter, 5)
    weights = np.array([10.0, 1.0, 250.0, 3.0, 42.0])
    result = make_aggregator("fedavg").aggregate(global_adapter, zip(updates, weights, strict=True))
    for name in global_adapter:
        expected = np.tensordot(weights / weights.sum(), stack(updates, name), axes=1)
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], expected, rtol=1e-6, atol=1e-7)


def test_weighted_mean_accumulates_in_float32_not_in_float16(make_adapter):
    global_adapter = make_adapter(seed=1)
    update = {n: np.full(v.shape, 1.0 + 2.0**-10, np.float16) for n, v in global_adapter.items()}
    tiny = {n: np.full(v.shape, 2.0**-10, np.float16) for n, v in global_adapter.items()}
    # 1 + 1/1024 and 1/1024 averaged with weights 1 and 1000 lose their low bits in float16.
    result = make_aggregator("fedavg").aggregate(global_adapter, [(update, 1.0), (tiny, 1000.0)])
    expected = ((1.0 + 2.0**-10) + 1000 * 2.0**-10) / 1001
    np.testing.assert_allclose(result[A], expected, rtol=1e-6)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_packed_updates_fold_in_batches_to_the_same_mean(make_adapter, batch):
    global_adapter = make_adapter(rank=8, seed=1)
    updates = site_updates(make_adapter, 7, rank=8)
    weights = [10.0, 1.0, 250.0, 3.0, 42.0, 7.0, 0.5]
    round_mean = WeightedMean(global_adapter, batch=batch)
    for update, weight in zip(updates, weights, strict=True):
        packed = from_record(to_record(update))
        assert packed.flat is not None
        round_mean.add(packed, weight)
    result = round_mean.mean()
    w = np.array(weights) / sum(weights)
    for name in global_adapter:
        np.testing.assert_allclose(result[name], np.tensordot(w, stack(updates, name), axes=1),
                                   rtol=1e-6, atol=1e-7)


def test_packed_and_per_tensor_updates_mix_in_one_round(make_adapter):
    global_adapter = make_adapter(rank=8, seed=1)
    full = site_updates(make_adapter, 3, rank=8)
    low = truncate_to_rank(make_adapter(rank=8, seed=9, dtype=np.float16), 2)
    mixed = [from_record(to_record(full[0])), full[1], from_record(to_record(low)),
             from_record(to_record(full[2], "float32"))]
    result = make_aggregator("fedavg").aggregate(global_adapter, [(u, 1.0) for u in mixed])
    reference = make_aggregator("fedavg").aggregate(
        global_adapter, [(u, 1.0) for u in (full[0], full[1], low, full[2])])
    for name in global_adapter:
        np.testing.assert_allclose(result[name], reference[name], rtol=1e-6, atol=1e-7)


def test_a_packed_update_in_another_tensor_order_is_still_matched_by_name(make_adapter):
    global_adapter = make_adapter(seed=1)
    update = make_adapter(seed=2)
    reordered = from_record(to_record(dict(reversed(list(update.items())))))
    result = make_aggregator("fedavg").aggregate(global_adapter, [(reordered, 2.0)])
    for name in global_adapter:
        np.testing.assert_allclose(result[name], update[name].astype(np.float32), rtol=1e-3)


def test_fedprox_server_rule_is_fedavgs(make_adapter):
    global_adapter = make_adapter(seed=1)
    updates = [(u, float(i + 1)) for i, u in enumerate(site_updates(make_adapter, 3))]
    fedavg = make_aggregator("fedavg").aggregate(global_adapter, updates)
    fedprox = make_aggregator("fedprox").aggregate(global_adapter, updates)
    for name in global_adapter:
        np.testing.assert_array_equal(fedavg[name], fedprox[name])


def test_mixed_rank_slices_average_over_the_sites_covering_them(make_adapter):
    global_adapter = make_adapter(rank=8, seed=1)
    ranks, weights = [8, 2, 5, 8], np.array([4.0, 1.0, 2.0, 3.0])
    updates = [
        truncate_to_rank(make_adapter(rank=8, dtype=np.float16, seed=10 + s), r)
        for s, r in enumerate(ranks)
    ]
    result = make_aggregator("fedavg").aggregate(global_adapter, zip(updates, weights, strict=True))
    for name, shape in ((A, (8, 16)), (B, (16, 8))):
        values = padded(updates, name, shape)
        for k in range(8):
            covering = [s for s, r in enumerate(ranks) if r > k]
            w = weights[covering] / weights[covering].sum()
            rows = values[covering, k, :] if name == A else values[covering, :, k]
            got = result[name][k] if name == A else result[name][:, k]
            np.testing.assert_allclose(got, w @ rows, rtol=1e-6, atol=1e-7)


def test_rank_slice_no_site_covers_keeps_the_global_value(make_adapter):
    global_adapter = make_adapter(rank=8, seed=1)
    updates = [truncate_to_rank(make_adapter(rank=8, seed=s), 3) for s in range(3)]
    result = make_aggregator("fedavg").aggregate(global_adapter, [(u, 1.0) for u in updates])
    np.testing.assert_array_equal(result[A][3:], global_adapter[A][3:])
    np.testing.assert_array_equal(result[B][:, 3:], global_adapter[B][:, 3:])
    assert not np.allclose(result[A][:3], global_adapter[A][:3])


def test_round_coverage_counts_the_sites_per_rank_slice(make_adapter):
    round_mean = WeightedMean(make_adapter(rank=4))
    for rank in (4, 1, 2):
        round_mean.add(truncate_to_rank(make_adapter(rank=4), rank), 1.0)
    np.testing.assert_array_equal(round_mean.coverage()[A], [3, 2, 1, 1])
    np.testing.assert_array_equal(round_mean.coverage()[B], [3, 2, 1, 1])


def test_round_without_updates_leaves_the_global_adapter_unchanged(make_adapter):
    global_adapter = make_adapter(seed=1)
    for strategy in STRATEGIES:
        result = make_aggregator(strategy).aggregate(global_adapter, [])
        for name in global_adapter:
            np.testing.assert_array_equal(result[name], global_adapter[name])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_a_weight_that_is_not_a_positive_count_is_refused(make_adapter, weight):
    round_mean = WeightedMean(make_adapter())
    with pytest.raises(ValueError, match="weight"):
        round_mean.add(make_adapter(), weight)


def test_unknown_strategy_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="'fedsgd' is not one of fedavg, fedprox, fedadam"):
        make_aggregator("fedsgd")


def test_trimmed_mean_beta_must_leave_values_to_average():
    with pytest.raises(ValueError, match=r"beta 0.5 is outside \[0, 0.5\)"):
        make_aggregator("trimmedmean", beta=0.5)


# ---- FedAdam ------------------------------------------------------------------------------


def adam_reference(x, means, eta=0.1, b1=0.9, b2=0.99, tau=1e-3):
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for t, mean in enumerate(means, start=1):
        g = x - mean
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        x = x - eta * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + tau)
    return x


def test_fedadam_steps_on_the_pseudo_gradient_like_adam(make_adapter):
    aggregator = make_aggregator("fedadam", server_learning_rate=0.05)
    current = make_adapter(seed=1)
    means = []
    for r in range(3):
        updates = site_updates(make_adapter, 2, dtype=np.float32, scale=0.1 + r)
        means.append({n: stack(updates, n).mean(axis=0) for n in current})
        current = aggregator.aggregate(current, [(u, 1.0) for u in updates])
    start = make_adapter(seed=1)
    for name in start:
        expected = adam_reference(start[name].astype(np.float64), [m[name] for m in means], eta=0.05)
        np.testing.assert_allclose(current[name], expected, rtol=1e-4, atol=1e-6)


def test_fedadam_resumed_from_its_state_dict_continues_identically(make_adapter):
    rounds = [site_updates(make_adapter, 2, dtype=np.float32, scale=0.1 * (r + 1)) for r in range(4)]

    straight = make_aggregator("fedadam")
    adapter = make_adapter(seed=1)
    for updates in rounds:
        adapter = straight.aggregate(adapter, [(u, 1.0) for u in updates])

    first = make_aggregator("fedadam")
    resumed_adapter = make_adapter(seed=1)
    for updates in rounds[:2]:
        resumed_adapter = first.aggregate(resumed_adapter, [(u, 1.0) for u in updates])
    state = {k: v.copy() for k, v in first.state_dict().items()}
    second = make_aggregator("fedadam")
    second.load_state_dict(state)
    for updates in rounds[2:]:
        resumed_adapter = second.aggregate(resumed_adapter, [(u, 1.0) for u in updates])

    assert int(second.state_dict()["step"][0]) == 4
    for name in adapter:
        np.testing.assert_array_equal(resumed_adapter[name], adapter[name])


def test_fedadam_state_from_another_rule_is_refused():
    with pytest.raises(ValueError, match="no 'step' entry"):
        FedAdam().load_state_dict({"m/x": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="keeps no state"):
        make_aggregator("fedavg").load_state_dict({"step": np.array([1])})


# ---- robust rules -------------------------------------------------------------------------


@pytest.mark.parametrize("sites", [1, 5, 6, 17, 20])
def test_coordinate_median_matches_numpy_median(make_adapter, sites):
    global_adapter = make_adapter(seed=1)
    updates = site_updates(make_adapter, sites)
    result = make_aggregator("median").aggregate(global_adapter, [(u, 7.0) for u in updates])
    for name in global_adapter:
        np.testing.assert_allclose(result[name], np.median(stack(updates, name), axis=0), rtol=1e-6)


@pytest.mark.parametrize(("sites", "beta"), [(5, 0.2), (10, 0.1), (7, 0.3), (4, 0.0), (20, 0.2)])
def test_trimmed_mean_matches_sorting_and_cutting_each_coordinate(make_adapter, sites, beta):
    global_adapter = make_adapter(seed=1)
    updates = site_updates(make_adapter, sites)
    result = make_aggregator("trimmedmean", beta=beta).aggregate(
        global_adapter, [(u, 1.0) for u in updates]
    )
    cut = int(beta * sites)
    for name in global_adapter:
        ordered = np.sort(stack(updates, name), axis=0)
        np.testing.assert_allclose(
            result[name], ordered[cut : sites - cut].mean(axis=0), rtol=1e-5, atol=1e-7
        )


def test_robust_rules_with_mixed_ranks_reduce_each_coordinate_over_the_sites_covering_it(
    make_adapter,
):
    global_adapter = make_adapter(rank=6, seed=1)
    ranks = [6, 6, 2, 4, 6, 1, 3]
    updates = [
        truncate_to_rank(make_adapter(rank=6, dtype=np.float16, seed=20 + s), r)
        for s, r in enumerate(ranks)
    ]
    median = make_aggregator("median").aggregate(global_adapter, [(u, 1.0) for u in updates])
    trimmed = make_aggregator("trimmedmean", beta=0.25).aggregate(
        global_adapter, [(u, 1.0) for u in updates]
    )
    for name, shape in ((A, (6, 16)), (B, (16, 6))):
        values = padded(updates, name, shape)
        for index in np.ndindex(*shape):
            column = values[(slice(None), *index)]
            present = np.sort(column[~np.isnan(column)])
            cut = int(0.25 * present.size)
            assert median[name][index] == pytest.approx(np.median(present), rel=1e-6)
            assert trimmed[name][index] == pytest.approx(
                present[cut : present.size - cut].mean(), rel=1e-5, abs=1e-7
            )


def test_robust_rule_keeps_global_value_where_no_site_covers(make_adapter):
    global_adapter = make_adapter(rank=6, seed=1)
    updates = [truncate_to_rank(make_adapter(rank=6, seed=s), 2) for s in range(3)]
    for strategy in ("median", "trimmedmean"):
        result = make_aggregator(strategy).aggregate(global_adapter, [(u, 1.0) for u in updates])
        np.testing.assert_array_equal(result[A][2:], global_adapter[A][2:])
        np.testing.assert_array_equal(result[B][:, 2:], global_adapter[B][:, 2:])


def test_one_poisoned_site_in_five_moves_fedavg_but_not_median_or_trimmed_mean(make_adapter):
    global_adapter = make_adapter(seed=1)
    clean = site_updates(make_adapter, 4, scale=0.01)
    poisoned = {n: np.full(v.shape, 1000.0, np.float16) for n, v in global_adapter.items()}
    updates = [(u, 100.0) for u in [*clean, poisoned]]
    clean_mean = {n: stack(clean, n).mean(axis=0) for n in global_adapter}

    def worst_error(strategy: str) -> float:
        result = make_aggregator(strategy).aggregate(global_adapter, updates)
        return max(float(np.abs(result[n] - clean_mean[n]).max()) for n in global_adapter)

    assert worst_error("fedavg") > 100
    assert worst_error("median") < 0.05
    assert worst_error("trimmedmean") < 0.05


def test_robust_round_spills_updates_to_disk_and_removes_them_after_the_round(
    make_adapter, tmp_path
):
    round_mean = TrimmedMean(make_adapter(), beta=0.2, spill_dir=tmp_path)
    for update in site_updates(make_adapter, 3):
        round_mean.add(update, 1.0)
    spilled = sorted(round_mean.spill_dir.iterdir())
    assert len(spilled) == 3
    values_per_site = sum(v.size for v in make_adapter().values())
    assert all(p.stat().st_size == 2 * values_per_site for p in spilled)  # float16 on disk
    round_mean.mean()
    assert not round_mean.spill_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_an_abandoned_robust_round_removes_its_spill_files(make_adapter, tmp_path):
    round_mean = CoordinateMedian(make_adapter(), spill_dir=tmp_path)
    round_mean.add(make_adapter(dtype=np.float16), 1.0)
    with round_mean:
        pass
    assert list(tmp_path.iterdir()) == []


# ---- memory -------------------------------------------------------------------------------


def peak_traced_bytes(strategy: str, make_adapter, sites: int, tmp_path,
                      packed: bool = False) -> tuple[int, int]:
    """Peak numpy memory of one round whose updates arrive one at a time, and the adapter size."""
    shape = {"layers": 8, "rank": 16, "hidden": 512, "kv": 256}
    global_adapter = make_adapter(**shape)
    parameters = sum(v.size for v in global_adapter.values())
    aggregator = make_aggregator(strategy, spill_dir=tmp_path)
    tracemalloc.start()
    try:
        round_mean = aggregator.begin_round(global_adapter)
        for s in range(sites):
            update = make_adapter(dtype=np.float16, seed=s, **shape)
            round_mean.add(from_record(to_record(update)) if packed else update, 1.0)
        aggregator.finish_round(round_mean)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, parameters


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "trimmedmean", "median"])
def test_peak_memory_of_a_round_does_not_grow_with_the_number_of_sites(
    make_adapter, tmp_path, strategy
):
    few, parameters = peak_traced_bytes(strategy, make_adapter, 2, tmp_path)
    many, _ = peak_traced_bytes(strategy, make_adapter, 24, tmp_path)
    # 24 float16 updates held at once would be 48 bytes a parameter; a streaming round holds a
    # few float32 copies (accumulator, optimiser moments), one update, and ~1.5 MB of blocks.
    assert many < 20 * parameters
    assert many < few + 8 * parameters


def test_packed_updates_waiting_to_be_folded_are_bounded_by_the_batch(make_adapter, tmp_path):
    # Full-rank packed updates wait in a batch (FOLD_BATCH = 16) to be folded in one pass: the
    # round holds at most a batch of them and the one that arrives while it folds, so past the
    # batch the peak stops growing (one float16 update is 2 bytes a parameter).
    batch, parameters = peak_traced_bytes("fedavg", make_adapter, FOLD_BATCH, tmp_path, packed=True)
    many, _ = peak_traced_bytes("fedavg", make_adapter, 3 * FOLD_BATCH, tmp_path, packed=True)
    assert many < batch + 4 * parameters
    assert many < FOLD_BATCH * 2 * parameters + 20 * parameters


def test_accumulators_are_reused_only_once_nothing_refers_to_them(make_adapter):
    aggregator = make_aggregator("fedavg")
    global_adapter = make_adapter(seed=1, dtype=np.float32)
    updates = [from_record(to_record(u)) for u in site_updates(make_adapter, 3)]
    first = aggregator.aggregate(global_adapter, [(u, 1.0) for u in updates])
    snapshot = {n: v.copy() for n, v in first.items()}
    # `first` is the global adapter of the next round: its buffer must not be written.
    second = aggregator.aggregate(first, [(u, 2.0) for u in updates[:2]])
    for name in first:
        np.testing.assert_array_equal(first[name], snapshot[name])
    base = next(iter(second.values())).base
    del first, snapshot
    third = aggregator.aggregate(second, [(u, 1.0) for u in updates])
    assert next(iter(third.values())).base is not base  # `second` still alive: another buffer
    expected = make_aggregator("fedavg").aggregate(second, [(u, 1.0) for u in updates])
    for name in third:
        np.testing.assert_array_equal(third[name], expected[name])


def test_a_dropped_rounds_accumulator_serves_the_next_round(make_adapter):
    aggregator = make_aggregator("fedavg")
    global_adapter = make_adapter(seed=1, dtype=np.float32)
    updates = [from_record(to_record(u)) for u in site_updates(make_adapter, 2)]
    result = aggregator.aggregate(global_adapter, [(u, 1.0) for u in updates])
    first_buffer = id(next(iter(result.values())).base)
    del result
    result = aggregator.aggregate(global_adapter, [(u, 1.0) for u in updates])
    assert id(next(iter(result.values())).base) == first_buffer
