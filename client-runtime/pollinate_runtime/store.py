"""Training state in S3: checkpoints with a pointer, published adapter versions, run progress.

Layout under the Federation's bucket and prefix (DESIGN.md, "Storage layout in S3"); a run's
key is its TrainingRound's name and the start of its uid (run_config.run_key):

    checkpoints/<run-key>/round-<k>/adapter.safetensors   global adapter (float32)
    checkpoints/<run-key>/round-<k>/strategy.safetensors  server optimiser state (m, v)
    checkpoints/<run-key>/round-<k>/privacy.json          DP accountant ledger
    checkpoints/<run-key>/round-<k>/metrics.json          per-round metrics so far
    checkpoints/<run-key>/round-<k>/state.json            anything else the server resumes
    checkpoints/<run-key>/round-<k>/manifest.json         sha256 and size of each above
    checkpoints/<run-key>/latest.json                     pointer: round, manifest sha256
    adapters/v<n>/adapter_model.safetensors               as PEFT writes it
    adapters/v<n>/adapter_config.json                     as PEFT writes it
    adapters/v<n>/manifest.json                           round, sites, metrics, checksums,
                                                          base model, parent version
    runs/<run-key>/progress.json                          round k/N, metrics, sites

The pointer protocol: every object of a checkpoint is written, then its manifest (checksums of
all of them), and only then the pointer naming the manifest and the manifest's checksum. A
reader starts from the pointer and verifies every checksum; a mismatch raises
`CorruptObject(key, expected, actual)`. A server that dies mid-checkpoint leaves the pointer on
the previous complete checkpoint, so a reader never loads a partial one; S3 gives read-after-
write consistency for each object, which is all this needs.

Adapter versions. `publish_adapter` lists existing `adapters/v<n>/` and claims the next n by
writing `adapter_config.json` with `IfNoneMatch: *` (a conditional put: of two publishers only
one can create it; the loser moves on to n + 1). The safetensors follow, and `manifest.json`
comes last: a version is complete once its manifest exists. On an S3 server without
conditional writes (it answers 501) the claim degrades to list-then-put, which is safe for the
one server that publishes a Federation's versions. If a claim's reply is lost and the retry
finds its own object, that version stays incomplete and publishing moves on to the next n:
a gap, never a mix of two adapters.

Outages. Every S3 call retries connection errors, timeouts and 5xx / throttling answers with
exponential backoff and jitter for up to `RetryPolicy.deadline_seconds` (60 s by default), so
a 30 s S3 outage delays a round instead of losing it; after that `StoreUnavailable` names the
endpoint, the operation and the key. botocore's own retries are off so there is one budget.

Credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN) or any other source of boto3's default chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import boto3
import botocore.exceptions
import numpy as np
import safetensors.numpy
from botocore.config import Config

from .wire import AdapterState, rank_axis

log = logging.getLogger(__name__)
T = TypeVar("T")

CHECKPOINT_FORMAT = "pollinate.checkpoint/v1"
POINTER_FORMAT = "pollinate.checkpoint-pointer/v1"
ADAPTER_MANIFEST_FORMAT = "pollinate.adapter/v1"
PROGRESS_FORMAT = "pollinate.progress/v1"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME
MANIFEST = "manifest.json"
# The peft release whose adapter_config.json `lora_adapter_config` reproduces.
PEFT_FORMAT_VERSION = "0.21.2"

# The most any object of each kind may hold. S3 objects are untrusted input: whoever can write
# the bucket could plant a pointer, manifest or progress document of gigabytes, and each is
# read into memory whole (by the server, the operator and sites). Each cap is far above what
# Pollinate writes: a pointer is ~300 bytes; a manifest a few KB; progress ~1 KB a round for
# ten sites; a checkpoint's JSON parts hold the per-round metrics; tensors are a LoRA adapter
# (r=64 on every projection of a 70B model is under 2 GB in float32).
MAX_POINTER_BYTES = 64 << 10
MAX_MANIFEST_BYTES = 4 << 20
MAX_JSON_BYTES = 64 << 20
MAX_TENSOR_BYTES = 4 << 30


class StoreError(Exception):
    """Base of the errors this module raises."""


class CorruptObject(StoreError):
    """An object's content does not match the checksum recorded for it (or it is missing)."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(
            f"s3 object {key!r} is corrupt: expected {expected}, found {actual}; "
            "it was not loaded"
        )
        self.key, self.expected, self.actual = key, expected, actual


class ObjectTooLarge(CorruptObject):
    """An object larger than its kind may be: refused before it is read."""

    def __init__(self, key: str, size: int, limit: int, what: str) -> None:
        super().__init__(key, f"{what} of at most {limit} bytes", f"{size} bytes")
        self.size, self.limit = size, limit


class StoreUnavailable(StoreError):
    """S3 did not answer within the retry deadline."""


class AdapterVersionNotFound(StoreError):
    """No complete adapter version with that number exists."""


# ---- S3 with retries ----------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep retrying a failing S3 call, and how fast."""

    deadline_seconds: float = 60.0
    first_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 5.0


_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed",
    "Throttling", "ThrottlingException", "XMinioServerNotInitialized", "XMinioReadQuorum",
    "XMinioWriteQuorum",
}


def is_transient(error: BaseException) -> bool:
    """Whether retrying may help: the network, a timeout, a 5xx, or throttling."""
    if isinstance(
        error, botocore.exceptions.ConnectionError | botocore.exceptions.HTTPClientError
    ):
        return True
    if isinstance(error, botocore.exceptions.ClientError):
        response = error.response
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        code = str(response.get("Error", {}).get("Code", ""))
        return (status >= 500 and status != 501) or code in _TRANSIENT_CODES
    return False


def error_code(error: BaseException) -> str:
    if isinstance(error, botocore.exceptions.ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def call_with_retry(
    operation: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run `operation`, retrying transient failures with backoff until the deadline."""
    start = clock()
    backoff = policy.first_backoff_seconds
    attempts = 0
    while True:
        attempts += 1
        try:
            return operation()
        except Exception as err:
            if not is_transient(err):
                raise
            elapsed = clock() - start
            remaining = policy.deadline_seconds - elapsed
            if remaining <= 0:
                raise StoreUnavailable(
                    f"{what} failed for {elapsed:.1f} s over {attempts} attempts "
                    f"(last error: {err}); expected S3 to answer within "
                    f"{policy.deadline_seconds:g} s"
                ) from err
            # Full jitter: servers restarting together should not retry in lockstep.
            pause = min(remaining, random.uniform(backoff / 2, backoff))
            log.warning("%s failed (%s); retrying in %.2f s", what, err, pause)
            sleep(pause)
            backoff = min(policy.max_backoff_seconds, backoff * 2)


def s3_client(
    endpoint_url: str | None = None,
    *,
    region: str | None = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    access_key: str | None = None,
    secret_key: str | None = None,
) -> Any:
    """A boto3 S3 client for `endpoint_url` (None: AWS); credentials from the environment
    unless given (the operator reads each Federation's own Secret)."""
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},  # call_with_retry owns retries
        s3={"addressing_style": "path"},  # MinIO and most S3-compatible servers
        # boto3 >= 1.36 adds CRC trailers many S3-compatible servers reject; sha256 in the
        # manifests already protects the content end to end.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3", endpoint_url=endpoint_url or None, region_name=region, config=config,
        aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ObjectStore:
    """Objects under one bucket and prefix, every call retried (see `RetryPolicy`)."""

    def __init__(
        self, client: Any, bucket: str, prefix: str = "", *, retry: RetryPolicy | None = None
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retry = retry or RetryPolicy()
        self._conditional_puts = True

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def url(self, relative: str) -> str:
        return f"s3://{self.bucket}/{self.key(relative)}"

    def _what(self, operation: str, relative: str) -> str:
        endpoint = getattr(self.client.meta, "endpoint_url", "")
        return f"S3 {operation} {self.url(relative)} at {endpoint}"

    def put(
        self, relative: str, data: bytes, *, content_type: str = "application/octet-stream",
        if_absent: bool = False,
    ) -> bool:
        """Write an object; with `if_absent`, only if none exists (False if one did)."""
        args: dict[str, Any] = {
            "Bucket": self.bucket, "Key": self.key(relative), "Body": data,
            "ContentType": content_type,
        }
        if if_absent and self._conditional_puts:
            args["IfNoneMatch"] = "*"
        try:
            call_with_retry(
                lambda: self.client.put_object(**args),
                what=self._what("PUT", relative), policy=self.retry,
            )
        except botocore.exceptions.ClientError as err:
            code = error_code(err)
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if code == "NotImplemented" and "IfNoneMatch" in args:
                log.warning(
                    "S3 at %s has no conditional writes; publishing relies on listing alone",
                    getattr(self.client.meta, "endpoint_url", ""),
                )
                self._conditional_puts = False
                return self.put(relative, data, content_type=content_type, if_absent=if_absent)
            raise
        return True

    def get(self, relative: str, max_bytes: int, what: str = "an object") -> bytes | None:
        """An object's bytes, or None if it does not exist; ObjectTooLarge, before anything
        more is read, if it holds more than `max_bytes` (`what` names the kind it should be)."""

        def read() -> bytes | None:
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self.key(relative))
            except botocore.exceptions.ClientError as err:
                if error_code(err) in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            body = response["Body"]
            try:
                declared = int(response.get("ContentLength") or 0)
                if declared > max_bytes:
                    raise ObjectTooLarge(self.key(relative), declared, max_bytes, what)
                # Not trusting the declared length either: at most one byte past the cap.
                data = body.read(max_bytes + 1)  # inside the retry: a cut stream is retried too
            finally:
                body.close()
            if len(data) > max_bytes:
                raise ObjectTooLarge(self.key(relative), len(data), max_bytes, what)
            return data

        return call_with_retry(read, what=self._what("GET", relative), policy=self.retry)

    def list(self, relative_prefix: str) -> list[str]:
        """Keys (relative to this store's prefix) starting with `relative_prefix`."""
        full = self.key(relative_prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def list_all() -> list[str]:
            keys: list[str] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
            return keys

        return call_with_retry(list_all, what=self._what("LIST", relative_prefix),
                               policy=self.retry)


# ---- formats ------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _finite_or_none(value: Any) -> Any:
    # JSON has no inf or NaN (and Kubernetes status rejects them): they are stored as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, np.generic):
        return _finite_or_none(value.item())
    return value


def _json_bytes(value: Any) -> bytes:
    return json.dumps(_finite_or_none(value), indent=2, sort_keys=True, allow_nan=False).encode()


def _tensor_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    # PEFT saves with metadata {"format": "pt"}; transformers warns about files without it.
    return safetensors.numpy.save(
        {n: np.ascontiguousarray(v) for n, v in tensors.items()}, metadata={"format": "pt"}
    )


def _verified(objects: ObjectStore, relative: str, expected_sha256: str,
              max_bytes: int = MAX_JSON_BYTES) -> bytes:
    data = objects.get(relative, max_bytes)
    if data is None:
        raise CorruptObject(objects.key(relative), f"sha256 {expected_sha256}", "no such object")
    actual = sha256_hex(data)
    if actual != expected_sha256:
        raise CorruptObject(objects.key(relative), f"sha256 {expected_sha256}", f"sha256 {actual}")
    return data


_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
               int: "a number", float: "a number", type(None): "null"}


def _parse_json(objects: ObjectStore, relative: str, data: bytes, what: str,
                kind: type | tuple[type, ...] = dict) -> Any:
    """An object's JSON, which must be a `kind` (an object unless told)."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, a 5000-digit int, deep nesting
        raise CorruptObject(objects.key(relative), what, f"unparseable JSON ({err})") from err
    if not isinstance(value, kind):
        raise CorruptObject(objects.key(relative), what, f"JSON {_JSON_KINDS.get(type(value))}")
    return value


def _parse_tensors(objects: ObjectStore, relative: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load(data)
    except (safetensors.SafetensorError, KeyError, ValueError) as err:  # KeyError: a dtype numpy lacks
        raise CorruptObject(objects.key(relative), "tensors in safetensors format",
                            f"unreadable safetensors ({type(err).__name__}: {err})") from err


def _listed_sha256(objects: ObjectStore, manifest: str, listing: Any, name: str) -> str:
    """The sha256 that the `listing` of the manifest at `manifest` records for `name`."""
    entry = listing.get(name) if isinstance(listing, dict) else None
    sha256 = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(sha256, str):
        raise CorruptObject(objects.key(manifest), f"an entry for {name} with its sha256",
                            "none" if entry is None else f"{entry!r:.100}")
    return sha256


def _check_name(kind: str, value: str) -> None:
    # Names become key segments; Kubernetes names are DNS-1123 labels and always pass.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value or ""):
        raise ValueError(
            f"{kind} {value!r} is not usable in an S3 key (letters, digits, '.', '_', '-')"
        )


def lora_adapter_config(
    base_model: str,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | tuple[str, ...],
    revision: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """adapter_config.json as peft 0.21's `LoraConfig.save_pretrained` writes it.

    Every field of peft's LoraConfig, at peft's defaults unless given; `inference_mode` is true
    as in a saved adapter. Written without importing peft (the server never imports torch).
    """
    config: dict[str, Any] = {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": None, "base_model_name_or_path": base_model, "bias": "none",
        "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "kasa_config": None, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": alpha, "lora_bias": False, "lora_dropout": dropout,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16, "r": rank,
        "rank_pattern": {}, "revision": revision, "target_modules": sorted(target_modules),
        "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None,
        "use_bdlora": None, "use_dora": False, "use_qalora": False, "use_rslora": False,
        "velora_config": None,
    }
    config.update(overrides)
    return config


def _adapter_rank(adapter: Mapping[str, np.ndarray]) -> int | None:
    ranks = {
        int(v.shape[axis])
        for n, v in adapter.items()
        if v.ndim == 2 and (axis := rank_axis(n)) is not None
    }
    return max(ranks) if ranks else None


# ---- what is stored -----------------------------------------------------------------------


@dataclass
class Checkpoint:
    """Everything a restarted server needs to continue after round `round`."""

    round: int
    adapter: AdapterState
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    privacy_state: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    server_state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointPointer:
    training_round: str
    round: int
    manifest_key: str
    manifest_sha256: str


@dataclass(frozen=True)
class PublishedAdapter:
    version: int
    adapter: AdapterState
    adapter_config: dict[str, Any]
    manifest: dict[str, Any]


@dataclass
class RunProgress:
    """What the operator reads into TrainingRound status (camelCase keys in the JSON)."""

    training_round: str
    round: int
    total_rounds: int
    phase: str = "Running"
    rounds: list[dict[str, Any]] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    last_checkpoint: str | None = None
    adapter_version: int | None = None
    message: str = ""
    updated_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROGRESS_FORMAT, "trainingRound": self.training_round,
            "round": self.round, "totalRounds": self.total_rounds, "phase": self.phase,
            "rounds": self.rounds, "sites": self.sites, "lastCheckpoint": self.last_checkpoint,
            "adapterVersion": self.adapter_version, "message": self.message,
            "updatedAt": self.updated_at or _now(),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> RunProgress:
        """Raises ValueError naming the first field that is missing or of another type."""
        progress = cls(
            training_round=_field(value, "trainingRound", str), round=_field(value, "round", int),
            total_rounds=_field(value, "totalRounds", int),
            phase=_field(value, "phase", str, "Running"), rounds=_field(value, "rounds", list, []),
            sites=_field(value, "sites", dict, {}),
            last_checkpoint=_field(value, "lastCheckpoint", str, None),
            adapter_version=_field(value, "adapterVersion", int, None),
            message=_field(value, "message", str, ""), updated_at=_field(value, "updatedAt", str, ""),
        )
        for name, entries in (("rounds", progress.rounds), ("sites", progress.sites.values())):
            for entry in entries:
                if not isinstance(entry, dict):
                    raise ValueError(f"{name} entry {entry!r:.60} (not an object)")
        return progress


_REQUIRED = object()


def _field(record: Mapping[str, Any], name: str, kind: type, default: Any = _REQUIRED) -> Any:
    """record[name], which must be a `kind`; absent (or null, where the default is None) gives
    `default`."""
    value = record.get(name, default)
    if value is _REQUIRED:
        raise ValueError(f"no {name}")
    if value is default:
        return value
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = "an integer" if kind is int else _JSON_KINDS[kind]
        raise ValueError(f"{name} {value!r:.60} (not {expected})")
    return value


# ---- the store ----------------------------------------------------------------------------

_CHECKPOINT_PARTS = (
    "adapter.safetensors", "strategy.safetensors", "privacy.json", "metrics.json", "state.json",
)
# The numbers publish_adapter writes: ASCII digits without a leading zero, short enough for int().
_VERSION_DIR = re.compile(r"^adapters/v(0|[1-9][0-9]{0,17})/(.+)$")


class FederationStore:
    """A Federation's training state under its bucket and prefix."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects

    @classmethod
    def connect(
        cls, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
        region: str | None = None, retry: RetryPolicy | None = None,
    ) -> FederationStore:
        return cls(ObjectStore(s3_client(endpoint_url, region=region), bucket, prefix, retry=retry))

    # ---- checkpoints ----------------------------------------------------------------------

    @staticmethod
    def checkpoint_dir(training_round: str, round: int) -> str:
        return f"checkpoints/{training_round}/round-{round}"

    @staticmethod
    def pointer_key(training_round: str) -> str:
        return f"checkpoints/{training_round}/latest.json"

    def save_checkpoint(self, training_round: str, checkpoint: Checkpoint) -> CheckpointPointer:
        """Write every part, then the manifest, then move the pointer to it."""
        _check_name("training round", training_round)
        if checkpoint.round < 0:
            raise ValueError(f"checkpoint round {checkpoint.round} must be >= 0")
        directory = self.checkpoint_dir(training_round, checkpoint.round)
        parts = {
            "adapter.safetensors": _tensor_bytes(checkpoint.adapter),
            "strategy.safetensors": _tensor_bytes(checkpoint.strategy_state),
            "privacy.json": _json_bytes(checkpoint.privacy_state),
            "metrics.json": _json_bytes(checkpoint.metrics),
            "state.json": _json_bytes(checkpoint.server_state),
        }
        listed = {}
        for name, data in parts.items():
            is_json = name.endswith(".json")
            content_type = "application/json" if is_json else "application/octet-stream"
            self.objects.put(f"{directory}/{name}", data, content_type=content_type)
            listed[name] = {"sha256": sha256_hex(data), "bytes": len(data)}
        manifest = _json_bytes({
            "format": CHECKPOINT_FORMAT, "trainingRound": training_round,
            "round": checkpoint.round, "createdAt": _now(), "objects": listed,
        })
        manifest_key = f"{directory}/{MANIFEST}"
        self.objects.put(manifest_key, manifest, content_type="application/json")
        pointer = CheckpointPointer(
            training_round, checkpoint.round, self.objects.key(manifest_key), sha256_hex(manifest)
        )
        # Last, and only after everything above succeeded: the checkpoint is now visible.
        self.objects.put(
            self.pointer_key(training_round),
            _json_bytes({
                "format": POINTER_FORMAT, "round": pointer.round, "manifest": manifest_key,
                "manifestSha256": pointer.manifest_sha256, "updatedAt": _now(),
            }),
            content_type="application/json",
        )
        return pointer

    def latest_checkpoint_pointer(self, training_round: str) -> CheckpointPointer | None:
        _check_name("training round", training_round)
        key = self.pointer_key(training_round)
        data = self.objects.get(key, MAX_POINTER_BYTES, "a checkpoint pointer")
        if data is None:
            return None
        pointer = _parse_json(self.objects, key, data, "a JSON checkpoint pointer")
        try:
            return CheckpointPointer(
                training_round, int(pointer["round"]), self.objects.key(pointer["manifest"]),
                str(pointer["manifestSha256"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CorruptObject(
                self.objects.key(key), "a pointer with round, manifest and manifestSha256",
                f"{data[:200]!r}",
            ) from err

    def load_checkpoint(self, training_round: str) -> Checkpoint | None:
        """The checkpoint the pointer names, every checksum verified; None if there is none."""
        pointer = self.latest_checkpoint_pointer(training_round)
        if pointer is None:
            return None
        manifest_rel = self.checkpoint_dir(training_round, pointer.round) + f"/{MANIFEST}"
        manifest_data = _verified(self.objects, manifest_rel, pointer.manifest_sha256, MAX_MANIFEST_BYTES)
        manifest = _parse_json(self.objects, manifest_rel, manifest_data, "a checkpoint manifest")
        if manifest.get("round") != pointer.round:
            raise CorruptObject(
                self.objects.key(manifest_rel), f"round {pointer.round} (from the pointer)",
                f"round {manifest.get('round')!r}",
            )
        directory = self.checkpoint_dir(training_round, pointer.round)
        parts: dict[str, bytes] = {}
        for name in _CHECKPOINT_PARTS:
            sha256 = _listed_sha256(self.objects, manifest_rel, manifest.get("objects"), name)
            parts[name] = _verified(self.objects, f"{directory}/{name}", sha256,
                                    MAX_TENSOR_BYTES if name.endswith(".safetensors") else MAX_JSON_BYTES)
        return Checkpoint(
            round=int(manifest["round"]),
            adapter=_parse_tensors(self.objects, f"{directory}/adapter.safetensors",
                                   parts["adapter.safetensors"]),
            strategy_state=_parse_tensors(self.objects, f"{directory}/strategy.safetensors",
                                          parts["strategy.safetensors"]),
            privacy_state=_parse_json(self.objects, f"{directory}/privacy.json",
                                      parts["privacy.json"], "a DP ledger or null",
                                      (dict, type(None))),
            metrics=_parse_json(self.objects, f"{directory}/metrics.json", parts["metrics.json"],
                                "a list of round metrics", list),
            server_state=_parse_json(self.objects, f"{directory}/state.json", parts["state.json"],
                                     "the server's state"),
        )

    # ---- adapter versions -----------------------------------------------------------------

    def _version_files(self) -> dict[int, set[str]]:
        versions: dict[int, set[str]] = {}
        for key in self.objects.list("adapters/v"):
            match = _VERSION_DIR.match(key)
            if match:
                versions.setdefault(int(match.group(1)), set()).add(match.group(2))
        return versions

    def adapter_versions(self) -> list[int]:
        """Complete versions (those with a manifest), ascending."""
        return sorted(v for v, files in self._version_files().items() if MANIFEST in files)

    def latest_adapter_version(self) -> int | None:
        versions = self.adapter_versions()
        return versions[-1] if versions else None

    def publish_adapter(
        self,
        adapter: Mapping[str, np.ndarray],
        adapter_config: Mapping[str, Any],
        *,
        training_round: str,
        round: int,
        sites: Mapping[str, int],
        metrics: Mapping[str, Any] | None = None,
        parent_version: int | None = None,
    ) -> PublishedAdapter:
        """Publish `adapter` as the next version v<n> in PEFT's files plus a manifest."""
        if adapter_config.get("peft_type") != "LORA":
            raise ValueError(
                f"adapter_config peft_type {adapter_config.get('peft_type')!r}; expected 'LORA'"
            )
        rank = _adapter_rank(adapter)
        if rank is not None and adapter_config.get("r") != rank:
            raise ValueError(
                f"adapter_config r {adapter_config.get('r')!r} does not match the adapter's "
                f"rank {rank}"
            )
        if parent_version is not None and parent_version not in self.adapter_versions():
            raise AdapterVersionNotFound(
                f"parent adapter version v{parent_version} does not exist under "
                f"{self.objects.url('adapters/')}"
            )
        weights = _tensor_bytes({n: np.asarray(v, np.float32) for n, v in adapter.items()})
        config = _json_bytes(dict(adapter_config))
        version = max(self._version_files(), default=0) + 1
        for _ in range(100):
            if self.objects.put(
                f"adapters/v{version}/{ADAPTER_CONFIG}", config,
                content_type="application/json", if_absent=True,
            ):
                break
            version += 1  # another publisher claimed it between our listing and our put
        else:
            raise StoreError(
                f"could not claim an adapter version under {self.objects.url('adapters/')}"
            )
        directory = f"adapters/v{version}"
        self.objects.put(f"{directory}/{ADAPTER_WEIGHTS}", weights)
        manifest = {
            "format": ADAPTER_MANIFEST_FORMAT, "version": version,
            "trainingRound": training_round, "round": round,
            "sites": [{"name": s, "examples": int(n)} for s, n in sorted(sites.items())],
            "metrics": dict(metrics or {}),
            "baseModel": {
                "name": adapter_config.get("base_model_name_or_path"),
                "revision": adapter_config.get("revision"),
            },
            "parentVersion": parent_version,
            "files": {
                ADAPTER_WEIGHTS: {"sha256": sha256_hex(weights), "bytes": len(weights)},
                ADAPTER_CONFIG: {"sha256": sha256_hex(config), "bytes": len(config)},
            },
            "createdAt": _now(),
        }
        self.objects.put(f"{directory}/{MANIFEST}", _json_bytes(manifest),
                         content_type="application/json")
        return PublishedAdapter(
            version, {n: np.asarray(v, np.float32) for n, v in adapter.items()},
            dict(adapter_config), manifest,
        )

    def adapter_manifest(self, version: int) -> dict[str, Any] | None:
        """Only the manifest of version v<version> (None if it has none): who published it
        and from what, without moving its weights."""
        relative = f"adapters/v{version}/{MANIFEST}"
        data = self.objects.get(relative, MAX_MANIFEST_BYTES, "an adapter manifest")
        return None if data is None else _parse_json(self.objects, relative, data, "an adapter manifest")

    def load_adapter(self, version: int) -> PublishedAdapter:
        """Version v<version>, its files verified against its manifest."""
        directory = f"adapters/v{version}"
        manifest_data = self.objects.get(f"{directory}/{MANIFEST}", MAX_MANIFEST_BYTES,
                                         "an adapter manifest")
        if manifest_data is None:
            available = ", ".join(f"v{v}" for v in self.adapter_versions()) or "none"
            raise AdapterVersionNotFound(
                f"adapter version v{version} does not exist under "
                f"{self.objects.url('adapters/')}; available: {available}"
            )
        manifest = _parse_json(
            self.objects, f"{directory}/{MANIFEST}", manifest_data, "an adapter manifest"
        )
        blobs = {}
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            sha256 = _listed_sha256(self.objects, f"{directory}/{MANIFEST}", manifest.get("files"),
                                    name)
            blobs[name] = _verified(self.objects, f"{directory}/{name}", sha256,
                                    MAX_TENSOR_BYTES if name == ADAPTER_WEIGHTS else MAX_JSON_BYTES)
        return PublishedAdapter(
            version, _parse_tensors(self.objects, f"{directory}/{ADAPTER_WEIGHTS}",
                                    blobs[ADAPTER_WEIGHTS]),
            _parse_json(self.objects, f"{directory}/{ADAPTER_CONFIG}", blobs[ADAPTER_CONFIG],
                        "a PEFT adapter config"),
            manifest,
        )

    # ---- progress -------------------------------------------------------------------------

    @staticmethod
    def progress_key(training_round: str) -> str:
        return f"runs/{training_round}/progress.json"

    def write_progress(self, progress: RunProgress) -> None:
        _check_name("training round", progress.training_round)
        self.objects.put(
            self.progress_key(progress.training_round), _json_bytes(progress.to_json()),
            content_type="application/json",
        )

    def read_progress(self, training_round: str) -> RunProgress | None:
        key = self.progress_key(training_round)
        data = self.objects.get(key, MAX_JSON_BYTES, "run progress JSON")
        if data is None:
            return None
        try:
            return RunProgress.from_json(_parse_json(self.objects, key, data, "run progress JSON"))
        except ValueError as err:
            raise CorruptObject(self.objects.key(key), "run progress JSON", str(err)) from err
