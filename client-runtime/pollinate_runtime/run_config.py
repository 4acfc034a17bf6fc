"""The configuration of one federated run, as it travels in Flower's run config.

The operator builds a `RunConfig` from a TrainingRound and its Federation and submits it
with the run; the server app and the client app read it back from `context.run_config`.
Flower's run config is a flat map of str/int/float/bool, hence the flat, kebab-case keys:
this module is the one place that knows them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from . import __version__

STRATEGIES = ("fedavg", "fedprox", "fedadam", "trimmedmean", "median")
TRANSPORT_DTYPES = ("float16", "float32")


class RunConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RunConfig:
    # Identity: where the run's state lives in S3 and what it reports to. A TrainingRound
    # deleted and created again under its name has another uid: its run is a new one.
    training_round: str = "default"
    training_round_uid: str = ""
    namespace: str = "default"
    federation: str = "default"
    # Base model and adapter.
    base_model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    base_model_revision: str = "main"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    site_ranks: dict[str, int] = field(default_factory=dict)
    # Rounds and strategy.
    rounds: int = 3
    strategy: str = "fedavg"
    fedprox_mu: float = 0.0
    server_learning_rate: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_tau: float = 1e-3
    trim_beta: float = 0.2
    min_sites: int = 1
    fraction_per_round: float = 1.0
    round_timeout_seconds: float = 900.0
    sites: tuple[str, ...] = ()
    # The Flower node id of each taking part site's registered key: the server talks to
    # these nodes only, and knows their names before they answer. Empty: every connected
    # node takes part (a server without node authentication, engine tests).
    site_nodes: dict[str, int] = field(default_factory=dict)
    initial_adapter_version: str = ""
    # Local training on each site.
    local_epochs: int = 0
    local_max_steps: int = 0
    batch_size: int = 4
    learning_rate: float = 2e-4
    max_grad_norm: float = 1.0
    sequence_length: int = 256
    gradient_checkpointing: bool = False
    # Privacy and transport.
    clipping_norm: float = 0.0
    noise_multiplier: float = 0.0
    target_delta: float = 1e-5
    transport_dtype: str = "float16"
    max_update_norm: float = 1000.0
    # A site's reported example count (its weight in the weighted strategies) is counted as
    # at most this: a site claiming 1e9 examples cannot become the whole average.
    max_examples_per_site: int = 1_000_000
    # Storage.
    s3_bucket: str = "pollinate"
    s3_prefix: str = ""
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise RunConfigError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.transport_dtype not in TRANSPORT_DTYPES:
            raise RunConfigError(
                f"transport-dtype {self.transport_dtype!r} is not one of {', '.join(TRANSPORT_DTYPES)}")
        if self.rounds < 1:
            raise RunConfigError(f"rounds {self.rounds} must be at least 1")
        if self.lora_rank < 1:
            raise RunConfigError(f"lora-rank {self.lora_rank} must be at least 1")
        if self.min_sites < 1:
            raise RunConfigError(f"min-sites {self.min_sites} must be at least 1")
        if not 0 < self.fraction_per_round <= 1:
            raise RunConfigError(f"fraction-per-round {self.fraction_per_round} must be in (0, 1]")
        if self.max_examples_per_site < 1:
            raise RunConfigError(f"max-examples-per-site {self.max_examples_per_site} must be at least 1")
        if self.noise_multiplier > 0 and self.clipping_norm <= 0:
            raise RunConfigError("noise-multiplier > 0 needs clipping-norm > 0")

    @property
    def run_key(self) -> str:
        """The run's own folder name in S3 (checkpoints/<run key>/, runs/<run key>/)."""
        return run_key(self.training_round, self.training_round_uid)

    def rank_of(self, site: str) -> int:
        return self.site_ranks.get(site, self.lora_rank)

    @property
    def s3_root(self) -> str:
        return self.s3_prefix.strip("/")

    # ---- Flower's flat run config --------------------------------------------------------
    def to_flower(self) -> dict[str, str | int | float | bool]:
        out: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
            out[_key(f.name)] = value
        return out

    @classmethod
    def from_flower(cls, config: dict[str, Any]) -> RunConfig:
        known = {_key(f.name): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in config.items():
            f = known.get(key)
            if f is None:
                continue  # Flower may add its own keys; they are not ours to judge.
            values[f.name] = _parse(f, key, raw)
        return cls(**values)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _parse(f: dataclasses.Field, key: str, raw: Any) -> Any:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            word = str(raw).lower()
            if word not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(word)
            return word in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(s for s in str(raw).split(",") if s)
        if isinstance(default, dict):
            pairs = [p.split("=", 1) for p in str(raw).split(",") if p]
            return {k: int(v) for k, v in pairs}
        return str(raw)
    except (TypeError, ValueError, OverflowError) as err:  # OverflowError: int(inf), float(10**400)
        raise RunConfigError(f"run config {key}={raw!r}: expected {type(default).__name__}") from err


def run_key(training_round: str, uid: str) -> str:
    """A TrainingRound's name with the first 8 characters of its uid: a TrainingRound created
    again under an old name never finds, resumes or reports the old one's state. Without a uid
    (a run started by hand) the name alone."""
    return f"{training_round}-{uid[:8]}" if uid else training_round


def flower_app_pyproject(config: RunConfig | None = None) -> str:
    """The pyproject.toml of Pollinate's Flower app bundle (FAB; app_bundle.py).

    The FAB carries no code: server and client apps are installed in the images (and on a
    laptop with pip), so a run only names them and declares every setting with its default
    (Flower takes a run's own values as overrides of declared keys only). `config` changes
    the defaults, for a bench that starts runs the way `flwr run` does.
    """
    defaults = (config or RunConfig()).to_flower()
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "pollinate"',
        f'version = "{__version__}"',
        'description = "Federated LoRA fine-tuning"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "pollinate"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "pollinate_runtime.server_app:app"',
        'clientapp = "pollinate_runtime.client_app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    for key, value in defaults.items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        else:
            rendered = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f'"{key}" = {rendered}')
    return "\n".join(lines) + "\n"
