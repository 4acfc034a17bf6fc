"""Central differential privacy: per-site clipping, Gaussian noise on the mean, an accountant.

The server (which sees each site's update, so this protects what the *published* adapters reveal
about a site, not what the server sees) does, per round:

1. clip each site's update delta (local - global, over the rank slices the site trained) to
   L2 norm `clipping_norm`: delta * min(1, C / ||delta||);
2. average the clipped deltas with uniform weights: an example-count weight would let one site
   move the mean by more than C / n, and the noise below is calibrated to C / n;
3. add Gaussian noise with std `noise_multiplier * clipping_norm / n` to the mean delta, n being
   the number of sites averaged. With mixed LoRA ranks, a rank slice is averaged over the n_k
   sites covering it, so its noise std is z * C / n_k: noise of std z * C on the *sum*, which
   has L2 sensitivity C whatever a site's rank, then divided by the public count n_k;
4. compose one Gaussian release per round in flwr's own RDP accountant
   (`flwr.serverapp.RdpAccountant`, backed by Google's dp-accounting) and report epsilon at the
   configured delta. By default no sampling amplification is claimed: Flower samples a fixed
   number of sites, and which of them answer depends on availability, not on a coin the
   accountant could model, so the reported epsilon is an upper bound.

Noise needs a mean-based rule (FedAvg, FedProx, FedAdam): the sensitivity of a trimmed mean or
median is not C / n, so `PrivateAggregator` refuses them when noise_multiplier > 0 (clipping
alone is allowed with any rule). FedAdam's server step is post-processing of the noised mean.

What survives a checkpoint: the accountant's ledger (`state_dict()`, JSON). The noise generator
state deliberately does not: anyone who can read the bucket could regenerate and subtract the
noise. A resumed server draws fresh noise from the operating system's entropy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)

from .aggregation import (
    BLOCK_ELEMENTS,
    Aggregator,
    RoundMean,
    along_rank_slices,
    as_rows,
    row_blocks,
)
from .wire import AdapterState


@dataclass(frozen=True)
class ClippedUpdate:
    """A site's update after clipping, and what clipping did to it."""

    adapter: AdapterState
    delta_norm: float
    clipped: bool


@dataclass(frozen=True)
class PrivacyReport:
    """The privacy spent so far, after `rounds` noised releases."""

    epsilon: float
    delta: float
    rounds: int
    noise_multiplier: float
    clipping_norm: float
    clipped_sites: int = 0
    sites: int = 0

    def as_metrics(self) -> dict[str, float]:
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-clipped-sites": float(self.clipped_sites),
        }


@dataclass
class CentralDP:
    """Clipping, noise and accounting for one run (see the module docstring)."""

    clipping_norm: float
    noise_multiplier: float
    population_size: int
    target_delta: float = 1e-5
    sampling: SamplingMethod = SamplingMethod.NO_AMPLIFICATION
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)
    accountant: RdpAccountant | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clipping_norm) and self.clipping_norm > 0):
            raise ValueError(
                f"privacy.clippingNorm {self.clipping_norm!r} must be a positive finite number"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"privacy.noiseMultiplier {self.noise_multiplier!r} must be >= 0 and finite"
            )
        if self.population_size < 1:
            raise ValueError(f"population size {self.population_size!r} must be >= 1 site")
        # Seeds are for tests; a run with seed=None draws from the OS (never from a checkpoint).
        self.rng = np.random.default_rng(self.seed)
        self.accountant = None
        if self.noise_multiplier > 0:
            relation = (
                NeighboringRelation.REPLACE_ONE
                if self.sampling is SamplingMethod.WITHOUT_REPLACEMENT
                else NeighboringRelation.ADD_OR_REMOVE_ONE
            )
            self.accountant = RdpAccountant(
                PrivacyConfig(
                    target_delta=self.target_delta,
                    population_size=self.population_size,
                    neighboring_relation=relation,
                    sampling_method=self.sampling,
                )
            )

    # ---- per site -------------------------------------------------------------------------

    def clip(
        self, site_adapter: Mapping[str, np.ndarray], global_adapter: Mapping[str, np.ndarray]
    ) -> ClippedUpdate:
        """`global + delta * min(1, C / ||delta||)` over the slices the site's rank covers."""
        deltas: AdapterState = {}
        squares = 0.0
        for name, values in site_adapter.items():
            base = global_adapter[name][tuple(slice(0, d) for d in values.shape)]
            delta = np.subtract(values, base, dtype=np.float32)
            flat = delta.reshape(-1)
            squares += float(np.dot(flat, flat))
            deltas[name] = delta
        norm = math.sqrt(squares)
        scale = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
        clipped: AdapterState = {}
        for name, delta in deltas.items():
            base = global_adapter[name][tuple(slice(0, d) for d in delta.shape)]
            if scale < 1.0:
                np.multiply(delta, np.float32(scale), out=delta)
            clipped[name] = np.add(delta, base, out=delta, dtype=np.float32)
        return ClippedUpdate(clipped, norm, scale < 1.0)

    # ---- per round ------------------------------------------------------------------------

    def add_noise(self, mean: AdapterState, coverage: Mapping[str, np.ndarray]) -> None:
        """Add N(0, (z C / n_k)^2) to each coordinate of `mean` in place, n_k from `coverage`."""
        if self.noise_multiplier == 0:
            return
        for name, values in mean.items():
            sites = coverage[name].astype(np.float64)
            std = np.zeros(sites.shape, np.float32)
            scale = self.noise_multiplier * self.clipping_norm
            np.divide(scale, sites, out=std, where=sites > 0, casting="unsafe")
            std_rows = as_rows(
                np.broadcast_to(along_rank_slices(name, values.shape, std), values.shape)
            )
            target = as_rows(values)
            draw = np.empty(max(BLOCK_ELEMENTS, target.shape[1]), np.float32)
            for rows in row_blocks(target.shape[0], target.shape[1], BLOCK_ELEMENTS):
                block = target[rows]
                noise = draw[: block.size].reshape(block.shape)
                self.rng.standard_normal(out=noise, dtype=np.float32)
                np.multiply(noise, std_rows[rows], out=noise)
                np.add(block, noise, out=block)

    def record_round(self, sites: int) -> PrivacyReport:
        """Compose this round's release (noise over `sites` sites) and report epsilon."""
        if self.accountant is None:
            return self.report()
        if sites < 1:
            return self.report()
        self.accountant.compose(
            GaussianPrivacyEvent(
                noise_multiplier=self.noise_multiplier,
                sample_size=min(sites, self.population_size),
                population_size=self.population_size,
            )
        )
        return self.report()

    def report(self) -> PrivacyReport:
        """Epsilon so far at the target delta; infinite without noise (no privacy claimed)."""
        if self.accountant is None:
            epsilon, rounds = math.inf, 0
        else:
            rounds = self.accountant.num_releases
            epsilon = self.accountant.get_epsilon(self.target_delta) if rounds else 0.0
        return PrivacyReport(
            epsilon=epsilon, delta=self.target_delta, rounds=rounds,
            noise_multiplier=self.noise_multiplier, clipping_norm=self.clipping_norm,
        )

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """JSON-serialisable state: the accountant's ledger (never the noise generator)."""
        return {
            "clipping_norm": self.clipping_norm,
            "noise_multiplier": self.noise_multiplier,
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        for key in ("clipping_norm", "noise_multiplier"):
            if float(state[key]) != float(getattr(self, key)):  # type: ignore[arg-type]
                raise ValueError(
                    f"checkpointed privacy {key} {state[key]!r} differs from this run's "
                    f"{getattr(self, key)!r}; the accounted epsilon would be wrong"
                )
        ledger = state.get("accountant")
        if self.accountant is not None and ledger is not None:
            self.accountant.load_state_dict(ledger)  # type: ignore[arg-type]


class PrivateRound(RoundMean):
    """A round that clips each update before the inner mean and noises the mean after it."""

    def __init__(self, inner: RoundMean, privacy: CentralDP) -> None:
        # No super().__init__: the inner round owns the accumulators and the coverage.
        self.inner = inner
        self.privacy = privacy
        self.global_adapter = inner.global_adapter
        self.clipped_sites = 0
        self.delta_norms: list[float] = []

    @property  # type: ignore[override]
    def sites(self) -> int:
        return self.inner.sites

    def add(self, adapter: Mapping[str, np.ndarray], weight: float = 1.0) -> None:
        """Clip, then add with weight 1 whatever `weight` claims (see the module docstring)."""
        clipped = self.privacy.clip(adapter, self.global_adapter)
        self.inner.add(clipped.adapter, 1.0)
        self.clipped_sites += int(clipped.clipped)
        self.delta_norms.append(clipped.delta_norm)

    def _add(self, adapter: Mapping[str, np.ndarray], weight: float, *, full: bool) -> None:
        raise NotImplementedError  # add() delegates to the inner round

    def coverage(self) -> dict[str, np.ndarray]:
        return self.inner.coverage()

    def mean(self) -> AdapterState:
        mean = self.inner.mean()
        self.privacy.add_noise(mean, self.inner.coverage())
        return mean

    def close(self) -> None:
        self.inner.close()


class PrivateAggregator(Aggregator):
    """An Aggregator whose rounds are private (composition, not a flag on every strategy)."""

    def __init__(self, inner: Aggregator, privacy: CentralDP) -> None:
        if privacy.noise_multiplier > 0 and inner.robust:
            raise ValueError(
                f"privacy.noiseMultiplier {privacy.noise_multiplier} needs a mean-based strategy "
                f"(fedavg, fedprox, fedadam), not {inner.name!r}: its sensitivity is not "
                "clippingNorm / sites"
            )
        super().__init__(inner.begin_round, inner.optimizer, name=inner.name)
        self.inner = inner
        self.privacy = privacy
        self.last_report: PrivacyReport | None = None

    def begin_round(self, global_adapter: Mapping[str, np.ndarray]) -> PrivateRound:
        return PrivateRound(self.inner.begin_round(global_adapter), self.privacy)

    def finish_round(self, round_mean: RoundMean) -> AdapterState:
        sites = round_mean.sites
        clipped = getattr(round_mean, "clipped_sites", 0)
        new_global = self.inner.finish_round(round_mean)
        report = self.privacy.record_round(sites)
        self.last_report = dataclasses.replace(report, clipped_sites=clipped, sites=sites)
        return new_global
