"""Central DP: clipping of update deltas, calibrated Gaussian noise, and flwr's RDP accountant."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from pollinate_runtime.aggregation import WeightedMean, make_aggregator
from pollinate_runtime.privacy import CentralDP, PrivateAggregator, PrivateRound
from pollinate_runtime.wire import truncate_to_rank

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def delta_norm(adapter, global_adapter) -> float:
    return math.sqrt(sum(
        float(np.sum((adapter[n].astype(np.float64) - global_adapter[n][
            tuple(slice(0, d) for d in adapter[n].shape)]) ** 2))
        for n in adapter
    ))


# ---- clipping -----------------------------------------------------------------------------


def test_update_delta_above_the_clipping_norm_is_scaled_down_to_it(make_adapter):
    global_adapter = make_adapter(seed=1)
    site = make_adapter(seed=2, scale=5.0)
    dp = CentralDP(clipping_norm=0.5, noise_multiplier=0.0, population_size=3)
    clipped = dp.clip(site, global_adapter)
    assert clipped.clipped and clipped.delta_norm == pytest.approx(delta_norm(site, global_adapter))
    assert delta_norm(clipped.adapter, global_adapter) == pytest.approx(0.5, rel=1e-5)
    # Clipping scales the delta: its direction is kept.
    direction = (site[A] - global_adapter[A]) / (clipped.adapter[A] - global_adapter[A])
    np.testing.assert_allclose(direction, direction.flat[0], rtol=1e-4)


def test_update_delta_within_the_clipping_norm_is_left_alone(make_adapter):
    global_adapter = make_adapter(seed=1)
    site = {n: v + np.float32(1e-3) for n, v in global_adapter.items()}
    clipped = CentralDP(10.0, 0.0, population_size=3).clip(site, global_adapter)
    assert not clipped.clipped
    for name in site:
        np.testing.assert_allclose(clipped.adapter[name], site[name], rtol=1e-6)


def test_clipping_bounds_the_delta_from_the_global_adapter_not_the_adapter_itself(make_adapter):
    global_adapter = {n: v * 100 for n, v in make_adapter(seed=1).items()}  # a large adapter
    site = {n: v + np.float32(1e-4) for n, v in global_adapter.items()}  # barely moved
    clipped = CentralDP(1.0, 0.0, population_size=3).clip(site, global_adapter)
    assert not clipped.clipped


def test_a_low_rank_site_is_clipped_on_the_slices_it_trained(make_adapter):
    global_adapter = make_adapter(rank=8, seed=1)
    site = truncate_to_rank(make_adapter(rank=8, seed=2, scale=3.0), 2)
    clipped = CentralDP(0.25, 0.0, population_size=3).clip(site, global_adapter)
    assert clipped.adapter[A].shape == (2, 16)
    assert delta_norm(clipped.adapter, global_adapter) == pytest.approx(0.25, rel=1e-5)


# ---- noise --------------------------------------------------------------------------------


def noise_of_one_round(make_adapter, *, sites, noise_multiplier, clipping_norm, ranks=None):
    global_adapter = make_adapter(rank=8, hidden=256, kv=256, seed=1)
    ranks = ranks or [8] * sites
    dp = CentralDP(clipping_norm, noise_multiplier, population_size=sites, seed=7)
    aggregator = PrivateAggregator(make_aggregator("fedavg"), dp)
    # Every site sends the global adapter back: the mean delta is 0, what remains is noise.
    updates = [(truncate_to_rank(global_adapter, r), 1.0) for r in ranks]
    result = aggregator.aggregate(global_adapter, updates)
    return {n: result[n] - global_adapter[n] for n in result}, aggregator


def test_noise_std_is_noise_multiplier_times_clipping_norm_over_sites(make_adapter):
    noise, _ = noise_of_one_round(make_adapter, sites=4, noise_multiplier=1.5, clipping_norm=2.0)
    values = np.concatenate([v.ravel() for v in noise.values()])
    assert values.size > 10_000
    assert abs(values.mean()) < 0.05
    assert values.std() == pytest.approx(1.5 * 2.0 / 4, rel=0.03)


def test_noise_on_a_rank_slice_is_scaled_by_the_sites_covering_it(make_adapter):
    noise, _ = noise_of_one_round(
        make_adapter, sites=4, noise_multiplier=1.0, clipping_norm=1.0, ranks=[8, 8, 2, 2]
    )
    lora_a = np.stack([noise[n] for n in noise if ".lora_A." in n])  # (modules, 8, 256)
    assert lora_a[:, :2].std() == pytest.approx(1.0 / 4, rel=0.05)  # covered by all 4 sites
    assert lora_a[:, 2:].std() == pytest.approx(1.0 / 2, rel=0.05)  # covered by 2 sites


def test_without_noise_the_private_mean_is_the_uniform_mean_of_clipped_updates(make_adapter):
    global_adapter = make_adapter(seed=1)
    sites = [make_adapter(seed=s, scale=0.5) for s in range(3)]
    dp = CentralDP(1.0, 0.0, population_size=3)
    result = PrivateAggregator(make_aggregator("fedavg"), dp).aggregate(
        global_adapter, [(s, 1000.0 * (i + 1)) for i, s in enumerate(sites)]
    )
    clipped = [dp.clip(s, global_adapter).adapter for s in sites]
    for name in global_adapter:
        expected = np.mean([c[name] for c in clipped], axis=0)  # example counts are ignored
        np.testing.assert_allclose(result[name], expected, rtol=1e-5, atol=1e-7)


def test_private_round_reports_how_many_sites_were_clipped(make_adapter):
    global_adapter = make_adapter(seed=1)
    private = PrivateRound(WeightedMean(global_adapter), CentralDP(1.0, 0.0, population_size=3))
    private.add(make_adapter(seed=2, scale=10.0), 5.0)
    private.add({n: v + np.float32(1e-4) for n, v in global_adapter.items()}, 5.0)
    assert private.clipped_sites == 1 and private.sites == 2


def test_noise_with_a_robust_strategy_is_refused_with_the_reason():
    dp = CentralDP(1.0, 1.0, population_size=5)
    for strategy in ("trimmedmean", "median"):
        with pytest.raises(ValueError, match=rf"noiseMultiplier 1.0 needs a mean-based.*{strategy}"):
            PrivateAggregator(make_aggregator(strategy), dp)
    PrivateAggregator(make_aggregator("median"), CentralDP(1.0, 0.0, population_size=5))


@pytest.mark.parametrize(
    ("clipping_norm", "noise_multiplier", "field"),
    [(0.0, 1.0, "clippingNorm"), (-1.0, 1.0, "clippingNorm"), (1.0, -0.1, "noiseMultiplier"),
     (math.inf, 1.0, "clippingNorm")],
)
def test_invalid_privacy_settings_are_refused_naming_the_field(clipping_norm, noise_multiplier, field):
    with pytest.raises(ValueError, match=field):
        CentralDP(clipping_norm, noise_multiplier, population_size=3)


# ---- accounting ---------------------------------------------------------------------------


def test_epsilon_is_finite_and_grows_every_round(make_adapter):
    global_adapter = make_adapter(seed=1)
    aggregator = PrivateAggregator(
        make_aggregator("fedavg"), CentralDP(1.0, 1.1, population_size=3, target_delta=1e-5)
    )
    epsilons = []
    for round_ in range(5):
        updates = [(make_adapter(seed=10 * round_ + s), 1.0) for s in range(3)]
        global_adapter = aggregator.aggregate(global_adapter, updates)
        report = aggregator.last_report
        assert report is not None and report.rounds == round_ + 1
        epsilons.append(report.epsilon)
    assert all(math.isfinite(e) and e > 0 for e in epsilons)
    assert all(later > earlier for earlier, later in itertools.pairwise(epsilons))


def test_epsilon_is_what_dp_accounting_gives_for_the_composed_gaussian_releases():
    dp = CentralDP(1.0, 1.3, population_size=4, target_delta=1e-6)
    for _ in range(7):
        report = dp.record_round(sites=4)
    reference = rdp.RdpAccountant()
    reference.compose(dp_event.GaussianDpEvent(1.3), 7)
    assert report.epsilon == pytest.approx(reference.get_epsilon(1e-6), rel=1e-9)


def test_without_noise_no_privacy_is_claimed():
    dp = CentralDP(1.0, 0.0, population_size=3)
    assert math.isinf(dp.record_round(sites=3).epsilon)


def test_a_round_without_sites_spends_no_privacy():
    dp = CentralDP(1.0, 1.0, population_size=3)
    dp.record_round(sites=3)
    before = dp.report().epsilon
    assert dp.record_round(sites=0).epsilon == before


def test_accountant_survives_a_checkpoint_through_json():
    first = CentralDP(1.0, 0.9, population_size=5, target_delta=1e-5)
    for _ in range(3):
        first.record_round(sites=5)
    saved = json.loads(json.dumps(first.state_dict()))

    resumed = CentralDP(1.0, 0.9, population_size=5, target_delta=1e-5)
    resumed.load_state_dict(saved)
    assert resumed.report().epsilon == first.report().epsilon
    assert resumed.record_round(sites=5).epsilon == first.record_round(sites=5).epsilon


def test_checkpoint_never_holds_the_noise_generator():
    state = json.dumps(CentralDP(1.0, 1.0, population_size=3, seed=42).state_dict())
    assert "rng" not in state and "seed" not in state and "bit_generator" not in state


def test_checkpoint_from_other_privacy_settings_is_refused():
    saved = CentralDP(1.0, 1.0, population_size=3).state_dict()
    with pytest.raises(ValueError, match=r"noise_multiplier 1\.0 differs from this run's 2\.0"):
        CentralDP(1.0, 2.0, population_size=3).load_state_dict(saved)
