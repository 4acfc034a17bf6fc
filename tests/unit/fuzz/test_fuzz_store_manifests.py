"""What the store reads back from S3, whatever a bucket holds: checkpoint pointers and
manifests, adapter version manifests and files, run progress, version listings. Each either
loads, or raises the store's CorruptObject naming the S3 key (and the field at fault); never a
raw KeyError, TypeError, JSONDecodeError or safetensors error. The checksums are resealed after
each change, so the parsing behind them is reached too."""

from __future__ import annotations

import json
import struct
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hostile_json import json_values, mutations
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pollinate_operator.clients import storage as operator_storage
from pollinate_runtime.store import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    Checkpoint,
    CorruptObject,
    FederationStore,
    ObjectStore,
    PublishedAdapter,
    RunProgress,
    lora_adapter_config,
    sha256_hex,
)

FUZZ = settings.get_profile("pollinate-fuzz")
ROUND = "notes-v1"
POINTER = f"checkpoints/{ROUND}/latest.json"
CHECKPOINT = f"checkpoints/{ROUND}/round-2"
VERSION = "adapters/v1"
PROGRESS = f"runs/{ROUND}/progress.json"


class MemoryObjects(ObjectStore):
    """ObjectStore's four calls over a dict: what is fuzzed is the parsing above them."""

    def __init__(self, blobs: dict[str, bytes] | None = None) -> None:
        super().__init__(client=None, bucket="pollinate", prefix="fed")
        self.blobs = dict(blobs or {})

    def put(self, relative: str, data: bytes, *, content_type: str = "", if_absent: bool = False
            ) -> bool:
        if if_absent and relative in self.blobs:
            return False
        self.blobs[relative] = data
        return True

    def get(self, relative: str, max_bytes: int, what: str = "an object") -> bytes | None:
        return self.blobs.get(relative)  # the caps are ObjectStore's, tested against real S3

    def list(self, relative_prefix: str) -> list[str]:
        return sorted(k for k in self.blobs if k.startswith(relative_prefix))


def adapter(rank: int = 2) -> dict[str, np.ndarray]:
    base = "base_model.model.model.layers.0.self_attn.q_proj"
    return {f"{base}.lora_A.weight": np.ones((rank, 4), np.float32),
            f"{base}.lora_B.weight": np.zeros((4, rank), np.float32)}


def saved_bucket() -> dict[str, bytes]:
    """A bucket as the server app leaves it: a checkpoint, a published version, progress."""
    store = FederationStore(MemoryObjects())
    store.save_checkpoint(ROUND, Checkpoint(
        round=2, adapter=adapter(), strategy_state={"m": np.zeros(3, np.float32)},
        privacy_state={"steps": 2}, metrics=[{"round": 1, "trainLoss": 2.5}],
        server_state={"sites": ["hospital-a"]}))
    store.publish_adapter(
        adapter(), lora_adapter_config("tiny", rank=2, alpha=4, dropout=0.0,
                                       target_modules=["q_proj"]),
        training_round=ROUND, round=2, sites={"hospital-a": 10})
    store.write_progress(RunProgress(
        training_round=ROUND, round=2, total_rounds=3, rounds=[{"round": 1, "perplexity": 9.5}],
        sites={"hospital-a": {"state": "Training"}}, adapter_version=1,
        last_checkpoint=f"s3://pollinate/fed/{CHECKPOINT}/{MANIFEST}"))
    return store.objects.blobs


BUCKET = saved_bucket()


def valid(relative: str) -> Any:
    return json.loads(BUCKET[relative])


def store_with(changes: dict[str, bytes] | None = None) -> FederationStore:
    """The saved bucket, with the objects in `changes` (relative keys) replaced."""
    return FederationStore(MemoryObjects({**BUCKET, **(changes or {})}))


def reseal(store: FederationStore, listing: str, relative: str, content: bytes) -> None:
    """Write `content` and record its checksum where `listing` ("objects" of a checkpoint
    manifest, "files" of an adapter manifest) names it, resealing the pointer above."""
    blobs = store.objects.blobs
    blobs[relative] = content
    directory, name = relative.rsplit("/", 1)
    manifest = json.loads(blobs[f"{directory}/{MANIFEST}"])
    manifest[listing][name] = {"sha256": sha256_hex(content), "bytes": len(content)}
    reseal_manifest(store, directory, json.dumps(manifest).encode())


def reseal_manifest(store: FederationStore, directory: str, content: bytes) -> None:
    blobs = store.objects.blobs
    blobs[f"{directory}/{MANIFEST}"] = content
    if directory == CHECKPOINT:
        pointer = json.loads(blobs[POINTER])
        pointer["manifestSha256"] = sha256_hex(content)
        blobs[POINTER] = json.dumps(pointer).encode()


def assert_corrupt_object_names(err: CorruptObject, *relatives: str) -> None:
    assert err.key in {f"fed/{r}" for r in relatives}, err.key
    assert err.key in str(err)
    assert len(str(err)) < 1000, str(err)[:1000]


def json_bytes(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: json.dumps(v).encode())


def hostile_json(valid_value: Any) -> st.SearchStrategy[bytes]:
    """The valid document mutated, any JSON, or any bytes."""
    return st.one_of(json_bytes(mutations(valid_value)), json_bytes(mutations(valid_value)),
                     json_bytes(json_values()), st.binary(max_size=64),
                     st.sampled_from([b"[" * 100_000, b'{"round": ' + b"1" * 5000 + b"}",
                                      b'{"round": Infinity}', b"\xff\xfe{}"]))


PART_KEYS = [f"{CHECKPOINT}/{name}" for name in (
    "adapter.safetensors", "strategy.safetensors", "privacy.json", "metrics.json", "state.json")]


def test_the_saved_bucket_loads():
    store = FederationStore(MemoryObjects(BUCKET))
    assert store.load_checkpoint(ROUND).round == 2
    assert store.load_adapter(1).version == 1
    assert store.read_progress(ROUND).adapter_version == 1


# ---- checkpoints --------------------------------------------------------------------------


@FUZZ
@given(pointer=hostile_json(valid(POINTER)))
@example(pointer=b'{"round": Infinity, "manifest": "m", "manifestSha256": "x"}')
@example(pointer=b'{"round": 1e400, "manifest": "m", "manifestSha256": "x"}')
@example(pointer=b"[" * 100_000)
def test_any_checkpoint_pointer_loads_or_is_a_corrupt_object_naming_it(pointer):
    store = store_with({POINTER: pointer})
    try:
        loaded = store.load_checkpoint(ROUND)
    except CorruptObject as err:
        # A pointer naming another round sends the reader to that round's missing manifest.
        assert err.key == f"fed/{POINTER}" or err.key.endswith(f"/{MANIFEST}")
        assert_corrupt_object_names(err, err.key.removeprefix("fed/"))
    else:
        assert loaded.round == 2


@FUZZ
@given(manifest=hostile_json(valid(f"{CHECKPOINT}/{MANIFEST}")))
@example(manifest=b'{"round": 2, "objects": []}')
@example(manifest=b'{"round": 2, "objects": {"adapter.safetensors": "abc"}}')
@example(manifest=b'{"round": 2, "objects": {"adapter.safetensors": {}}}')
@example(manifest=b"[2]")
def test_any_checkpoint_manifest_loads_or_is_a_corrupt_object_naming_it(manifest):
    store = store_with()
    reseal_manifest(store, CHECKPOINT, manifest)
    try:
        loaded = store.load_checkpoint(ROUND)
    except CorruptObject as err:
        assert_corrupt_object_names(err, f"{CHECKPOINT}/{MANIFEST}", *PART_KEYS)
    else:
        assert isinstance(loaded, Checkpoint)


def safetensors_like(header: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """A safetensors file's layout (header length, JSON header, data) with any header."""
    def build(drawn: tuple[Any, bytes]) -> bytes:
        encoded = json.dumps(drawn[0]).encode()
        return struct.pack("<Q", len(encoded)) + encoded + drawn[1]
    return st.tuples(header, st.binary(max_size=32)).map(build)


tensor_headers = st.dictionaries(
    st.text(max_size=8),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "X"]),
                           "shape": st.lists(st.integers(-1, 4), max_size=3),
                           "data_offsets": st.lists(st.integers(-1, 40), max_size=3)})
    | json_values(), max_size=3)


@FUZZ
@given(part=st.sampled_from(PART_KEYS), content=st.one_of(
    st.binary(max_size=64), json_bytes(json_values()), safetensors_like(tensor_headers)))
@example(part=PART_KEYS[0], content=b"not safetensors")
@example(part=PART_KEYS[2], content=b"{not json")
@example(part=PART_KEYS[3], content=b'{"a": 1}')  # metrics are a list
def test_any_checkpoint_part_loads_or_is_a_corrupt_object_naming_it(part, content):
    store = store_with()
    reseal(store, "objects", part, content)
    try:
        loaded = store.load_checkpoint(ROUND)
    except CorruptObject as err:
        assert_corrupt_object_names(err, part)
    else:
        assert isinstance(loaded.metrics, list) and isinstance(loaded.server_state, dict)
        assert loaded.privacy_state is None or isinstance(loaded.privacy_state, dict)


# ---- adapter versions ---------------------------------------------------------------------


@FUZZ
@given(manifest=hostile_json(valid(f"{VERSION}/{MANIFEST}")))
@example(manifest=b'{"files": {"adapter_model.safetensors": "abc"}}')
@example(manifest=b'{"files": "adapter_model.safetensors adapter_config.json"}')
@example(manifest=b"null")
def test_any_adapter_manifest_loads_or_is_a_corrupt_object_naming_it(manifest):
    store = store_with({f"{VERSION}/{MANIFEST}": manifest})
    try:
        loaded = store.load_adapter(1)
    except CorruptObject as err:
        assert_corrupt_object_names(err, f"{VERSION}/{MANIFEST}", f"{VERSION}/{ADAPTER_WEIGHTS}",
                                    f"{VERSION}/{ADAPTER_CONFIG}")
    else:
        assert isinstance(loaded, PublishedAdapter) and isinstance(loaded.manifest, dict)


@FUZZ
@given(name=st.sampled_from([ADAPTER_WEIGHTS, ADAPTER_CONFIG]), content=st.one_of(
    st.binary(max_size=64), json_bytes(json_values()), safetensors_like(tensor_headers)))
@example(name=ADAPTER_CONFIG, content=b"[]")
@example(name=ADAPTER_WEIGHTS, content=b"")
def test_any_adapter_file_loads_or_is_a_corrupt_object_naming_it(name, content):
    store = store_with()
    reseal(store, "files", f"{VERSION}/{name}", content)
    try:
        loaded = store.load_adapter(1)
    except CorruptObject as err:
        assert_corrupt_object_names(err, f"{VERSION}/{name}")
    else:
        assert isinstance(loaded.adapter_config, dict)


@FUZZ
@given(keys=st.lists(st.one_of(
    st.text(max_size=30), st.text(max_size=12).map(lambda t: f"adapters/v{t}/{MANIFEST}"),
    st.integers(0, 10**30).map(lambda n: f"adapters/v{n}/{MANIFEST}")), max_size=5))
@example(keys=[f"adapters/v{'1' * 5000}/{MANIFEST}"])  # Python's limit on digits in an int
@example(keys=[f"adapters/v\u0663/{MANIFEST}"])  # a digit, but not 0-9
def test_any_listing_gives_the_complete_versions(keys):
    store = FederationStore(MemoryObjects({k: b"{}" for k in keys}))
    versions = store.adapter_versions()
    assert all(f"adapters/v{v}/{MANIFEST}" in keys for v in versions)


# ---- progress -----------------------------------------------------------------------------


@FUZZ
@given(progress=hostile_json(valid(PROGRESS)))
@example(progress=b'{"trainingRound": "notes-v1", "totalRounds": 3}')
@example(progress=b'{"trainingRound": "notes-v1", "round": "two", "totalRounds": 3}')
@example(progress=b'{"trainingRound": "notes-v1", "round": 2, "totalRounds": 3, "rounds": 7}')
@example(progress=b'{"trainingRound": "notes-v1", "round": Infinity, "totalRounds": 3}')
def test_any_progress_reads_or_is_a_corrupt_object_naming_the_field(progress):
    store = store_with({PROGRESS: progress})
    try:
        read = store.read_progress(ROUND)
    except CorruptObject as err:
        assert_corrupt_object_names(err, PROGRESS)
        document = _json_or_none(progress)
        if isinstance(document, dict):
            missing = [f for f in ("trainingRound", "round", "totalRounds") if f not in document]
            assert not missing or missing[0] in str(err)
    else:
        assert isinstance(read.training_round, str)
        assert isinstance(read.round, int) and isinstance(read.total_rounds, int)
        assert isinstance(read.phase, str) and isinstance(read.message, str)
        assert all(isinstance(r, dict) for r in read.rounds)
        assert all(isinstance(s, dict) for s in read.sites.values())
        assert read.last_checkpoint is None or isinstance(read.last_checkpoint, str)
        assert read.adapter_version is None or isinstance(read.adapter_version, int)


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


@FUZZ
@given(progress=hostile_json(valid(PROGRESS)))
@example(progress=b'{"trainingRound": "notes-v1", "round": 2, "totalRounds": 3, '
                  b'"rounds": [{"round": 1, "perplexity": "low"}]}')
@example(progress=b'{"trainingRound": "notes-v1", "round": 2, "totalRounds": 3, '
                  b'"rounds": ["round 1"]}')
def test_the_operator_reads_any_progress_or_waits_for_a_readable_one(progress):
    # As the TrainingRound handler reads it each pass: a bad file must not fail the pass.
    store = store_with({PROGRESS: progress})
    with mock.patch.object(operator_storage, "federation_store", return_value=store):
        read = operator_storage.read_progress(None, "fed", "ns", ROUND)  # type: ignore[arg-type]
    assert read is None or isinstance(read.round, int)


@pytest.mark.parametrize("relative", [POINTER, f"{CHECKPOINT}/{MANIFEST}", PROGRESS])
def test_objects_that_are_not_json_are_named_with_what_was_expected(relative):
    store = store_with({relative: b"\x00\x01"})
    with pytest.raises(CorruptObject, match="expected") as caught:
        store.read_progress(ROUND) if relative == PROGRESS else store.load_checkpoint(ROUND)
    assert caught.value.key == f"fed/{relative}"
