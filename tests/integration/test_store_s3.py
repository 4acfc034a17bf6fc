"""The store against a real S3 server (the testbed's MinIO, versioned bucket): checkpoints and
their pointer, corruption detection, adapter versions PEFT can load, progress, and outages.

Outages are real network failures: a small TCP proxy in front of MinIO that starts late (a
closed port until then) or cuts the connection after a number of bytes and stops listening."""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flower_processes import free_port
from pollinate_runtime.store import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    MAX_JSON_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_POINTER_BYTES,
    AdapterVersionNotFound,
    Checkpoint,
    CorruptObject,
    FederationStore,
    ObjectStore,
    ObjectTooLarge,
    RetryPolicy,
    RunProgress,
    StoreUnavailable,
    lora_adapter_config,
    s3_client,
)
from pollinate_testbed import Testbed
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.cluster

LAYER = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"


def lora_adapter(rank: int = 4, hidden: int = 32, layers: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    adapter = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            adapter[LAYER.format(layer, module, "A")] = rng.standard_normal((rank, hidden)).astype(np.float32)
            adapter[LAYER.format(layer, module, "B")] = rng.standard_normal((hidden, rank)).astype(np.float32)
    return adapter


def checkpoint(round_: int, *, seed: int = 0, hidden: int = 32) -> Checkpoint:
    return Checkpoint(
        round=round_,
        adapter=lora_adapter(hidden=hidden, seed=seed),
        strategy_state={"step": np.array([round_], np.int64),
                        "m/x": np.full((3, 3), 0.5, np.float32)},
        privacy_state={"accountant": {"compositions": [round_]}},
        metrics=[{"round": r, "trainLoss": 2.0 / r, "epsilon": float("inf")}
                 for r in range(1, round_ + 1)],
        server_state={"sites": {"hospital-a": "Ready"}},
    )


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def s3_env(testbed: Testbed, monkeypatch: pytest.MonkeyPatch):
    settings = testbed.s3()
    for key, value in settings.env().items():
        monkeypatch.setenv(key, value)
    return settings


@pytest.fixture
def prefix(testbed: Testbed, s3_env) -> Iterator[str]:
    """A fresh prefix per test; every version of every object under it is removed after."""
    name = f"store-test-{uuid.uuid4().hex[:8]}"
    yield name
    client = testbed.s3_client()
    paginator = client.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=s3_env.bucket, Prefix=f"{name}/"):
        doomed = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                  for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        if doomed:
            client.delete_objects(Bucket=s3_env.bucket, Delete={"Objects": doomed})


@pytest.fixture
def store(s3_env, prefix) -> FederationStore:
    return FederationStore.connect(
        s3_env.bucket, prefix, endpoint_url=s3_env.endpoint, region=s3_env.region,
        retry=RetryPolicy(deadline_seconds=20),
    )


def raw_get(testbed: Testbed, bucket: str, key: str) -> bytes:
    return testbed.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


# ---- a TCP proxy for real outages ---------------------------------------------------------


def store_through(port: int, s3_env, prefix: str, deadline: float) -> FederationStore:
    objects = ObjectStore(
        s3_client(f"http://127.0.0.1:{port}", region=s3_env.region, connect_timeout=1,
                  read_timeout=5),
        s3_env.bucket, prefix, retry=RetryPolicy(deadline_seconds=deadline,
                                                 max_backoff_seconds=1.0),
    )
    return FederationStore(objects)


def minio_port(s3_env) -> int:
    return int(s3_env.endpoint.rsplit(":", 1)[1])


# ---- checkpoints --------------------------------------------------------------------------


def test_no_checkpoint_yet_loads_as_none(store):
    assert store.load_checkpoint("notes-v1") is None


def test_checkpoint_round_trips_through_s3(store):
    saved = checkpoint(3)
    pointer = store.save_checkpoint("notes-v1", saved)
    assert pointer.round == 3
    loaded = store.load_checkpoint("notes-v1")
    assert loaded is not None and loaded.round == 3
    for name, values in saved.adapter.items():
        np.testing.assert_array_equal(loaded.adapter[name], values)
    np.testing.assert_array_equal(loaded.strategy_state["step"], [3])
    np.testing.assert_array_equal(loaded.strategy_state["m/x"], saved.strategy_state["m/x"])
    assert loaded.privacy_state == saved.privacy_state
    assert loaded.server_state == saved.server_state
    assert loaded.metrics[0] == {"round": 1, "trainLoss": 2.0, "epsilon": None}  # JSON: no inf


def test_checkpoint_objects_are_laid_out_under_the_training_round(store, testbed, s3_env, prefix):
    store.save_checkpoint("notes-v1", checkpoint(1))
    keys = {o["Key"] for o in testbed.s3_client().list_objects_v2(
        Bucket=s3_env.bucket, Prefix=f"{prefix}/checkpoints/")["Contents"]}
    directory = f"{prefix}/checkpoints/notes-v1/round-1"
    assert keys == {f"{directory}/{part}" for part in (
        "adapter.safetensors", "strategy.safetensors", "privacy.json", "metrics.json",
        "state.json", "manifest.json")} | {f"{prefix}/checkpoints/notes-v1/latest.json"}
    pointer = json.loads(raw_get(testbed, s3_env.bucket,
                                 f"{prefix}/checkpoints/notes-v1/latest.json"))
    assert pointer["round"] == 1 and pointer["manifest"] == "checkpoints/notes-v1/round-1/manifest.json"


def test_a_restarted_reader_resumes_from_the_latest_round(store, s3_env, prefix):
    for round_ in (1, 2, 3):
        store.save_checkpoint("notes-v1", checkpoint(round_, seed=round_))
    restarted = FederationStore.connect(s3_env.bucket, prefix, endpoint_url=s3_env.endpoint,
                                        region=s3_env.region)
    loaded = restarted.load_checkpoint("notes-v1")
    assert loaded is not None and loaded.round == 3
    np.testing.assert_array_equal(loaded.adapter[LAYER.format(0, "q_proj", "A")],
                                  lora_adapter(seed=3)[LAYER.format(0, "q_proj", "A")])


def test_pointer_is_not_advanced_when_a_checkpoint_write_is_cut_off(
    store, testbed, s3_env, prefix
):
    store.save_checkpoint("notes-v1", checkpoint(1))
    # Round 2's adapter is ~8 MB; the proxy dies after 2 MB of it and never comes back.
    proxy = TcpProxy(minio_port(s3_env), free_port(), cut_after_bytes=2_000_000).start()
    dying = store_through(proxy.port, s3_env, prefix, deadline=3)
    with pytest.raises(StoreUnavailable):
        dying.save_checkpoint("notes-v1", checkpoint(2, hidden=16_000))
    assert proxy.cut.is_set()

    pointer = store.latest_checkpoint_pointer("notes-v1")
    assert pointer is not None and pointer.round == 1
    loaded = store.load_checkpoint("notes-v1")
    assert loaded is not None and loaded.round == 1
    listed = testbed.s3_client().list_objects_v2(
        Bucket=s3_env.bucket, Prefix=f"{prefix}/checkpoints/notes-v1/round-2/")
    assert f"{prefix}/checkpoints/notes-v1/round-2/manifest.json" not in {
        o["Key"] for o in listed.get("Contents", [])}


def test_corrupted_checkpoint_object_is_detected_and_named(store, testbed, s3_env, prefix):
    store.save_checkpoint("notes-v1", checkpoint(2))
    key = f"{prefix}/checkpoints/notes-v1/round-2/adapter.safetensors"
    original = raw_get(testbed, s3_env.bucket, key)
    flipped = bytearray(original)
    flipped[-1] ^= 0x01
    testbed.s3_client().put_object(Bucket=s3_env.bucket, Key=key, Body=bytes(flipped))

    with pytest.raises(CorruptObject) as caught:
        store.load_checkpoint("notes-v1")
    err = caught.value
    assert err.key == key
    assert err.expected.startswith("sha256 ") and err.actual.startswith("sha256 ")
    assert err.expected != err.actual
    assert key in str(err) and "not loaded" in str(err)


def test_missing_checkpoint_object_is_detected_and_named(store, testbed, s3_env, prefix):
    store.save_checkpoint("notes-v1", checkpoint(1))
    key = f"{prefix}/checkpoints/notes-v1/round-1/strategy.safetensors"
    testbed.s3_client().delete_object(Bucket=s3_env.bucket, Key=key)
    with pytest.raises(CorruptObject, match="no such object") as caught:
        store.load_checkpoint("notes-v1")
    assert caught.value.key == key


def test_a_manifest_changed_after_the_pointer_was_written_is_detected(
    store, testbed, s3_env, prefix
):
    store.save_checkpoint("notes-v1", checkpoint(1))
    key = f"{prefix}/checkpoints/notes-v1/round-1/manifest.json"
    manifest = json.loads(raw_get(testbed, s3_env.bucket, key))
    manifest["round"] = 7
    testbed.s3_client().put_object(Bucket=s3_env.bucket, Key=key,
                                   Body=json.dumps(manifest).encode())
    with pytest.raises(CorruptObject) as caught:
        store.load_checkpoint("notes-v1")
    assert caught.value.key == key


@pytest.mark.parametrize(("what", "relative", "limit"), [
    ("a checkpoint pointer", "checkpoints/notes-v1/latest.json", MAX_POINTER_BYTES),
    ("run progress JSON", "runs/notes-v1/progress.json", MAX_JSON_BYTES),
    ("an adapter manifest", "adapters/v1/manifest.json", MAX_MANIFEST_BYTES),
])
def test_an_object_larger_than_its_kind_may_be_is_refused_unread(store, testbed, s3_env, prefix,
                                                                  what, relative, limit):
    # Whoever can write the bucket could plant gigabytes where a small document is read whole
    # by the server, the operator and every site: refused by its size, naming key and cap.
    store.save_checkpoint("notes-v1", checkpoint(1))
    key = f"{prefix}/{relative}"
    planted = b"{" + b" " * limit + b"}"
    testbed.s3_client().put_object(Bucket=s3_env.bucket, Key=key, Body=planted)
    read = {"a checkpoint pointer": lambda: store.load_checkpoint("notes-v1"),
            "run progress JSON": lambda: store.read_progress("notes-v1"),
            "an adapter manifest": lambda: store.adapter_manifest(1)}[what]
    with pytest.raises(ObjectTooLarge) as caught:
        read()
    err = caught.value
    assert (err.key, err.size, err.limit) == (key, len(planted), limit)
    assert f"expected {what} of at most {limit} bytes, found {len(planted)} bytes" in str(err)
    assert "not loaded" in str(err)


# ---- adapter versions ---------------------------------------------------------------------


def config(rank: int = 4) -> dict:
    return lora_adapter_config("HuggingFaceTB/SmolLM2-135M-Instruct", rank=rank, alpha=8,
                               dropout=0.05, target_modules=["q_proj", "v_proj"], revision="main")


def test_adapter_versions_are_numbered_in_order_with_parent_links(store):
    assert store.adapter_versions() == []
    first = store.publish_adapter(lora_adapter(seed=1), config(), training_round="notes-v1",
                                  round=3, sites={"hospital-a": 120, "alice-laptop": 40},
                                  metrics={"evalPerplexity": 12.5})
    second = store.publish_adapter(lora_adapter(seed=2), config(), training_round="notes-v2",
                                   round=5, sites={"hospital-a": 80}, parent_version=first.version)
    assert (first.version, second.version) == (1, 2)
    assert store.adapter_versions() == [1, 2] and store.latest_adapter_version() == 2

    loaded = store.load_adapter(2)
    assert loaded.manifest["parentVersion"] == 1
    assert store.load_adapter(1).manifest["parentVersion"] is None
    assert loaded.manifest["round"] == 5 and loaded.manifest["trainingRound"] == "notes-v2"
    assert loaded.manifest["sites"] == [{"name": "hospital-a", "examples": 80}]
    assert loaded.manifest["baseModel"] == {"name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                            "revision": "main"}
    for name, values in lora_adapter(seed=2).items():
        np.testing.assert_array_equal(loaded.adapter[name], values)


def test_a_version_holds_exactly_peft_files_and_the_manifest(store, testbed, s3_env, prefix):
    store.publish_adapter(lora_adapter(), config(), training_round="t", round=1, sites={"a": 1})
    listed = testbed.s3_client().list_objects_v2(Bucket=s3_env.bucket,
                                                 Prefix=f"{prefix}/adapters/v1/")
    assert {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]} == {
        ADAPTER_WEIGHTS, ADAPTER_CONFIG, MANIFEST}
    weights = raw_get(testbed, s3_env.bucket, f"{prefix}/adapters/v1/{ADAPTER_WEIGHTS}")
    header_length = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8 : 8 + header_length])
    assert header["__metadata__"] == {"format": "pt"}
    assert header[LAYER.format(0, "q_proj", "A")]["dtype"] == "F32"


def test_publishing_after_an_incomplete_version_takes_the_next_number(
    store, testbed, s3_env, prefix
):
    # Another publisher has claimed v1 (its config is written) but not finished it.
    testbed.s3_client().put_object(Bucket=s3_env.bucket, Key=f"{prefix}/adapters/v1/{ADAPTER_CONFIG}",
                                   Body=b"{}")
    published = store.publish_adapter(lora_adapter(), config(), training_round="t", round=1,
                                      sites={"a": 1})
    assert published.version == 2
    assert store.adapter_versions() == [2]


def test_conditional_put_never_overwrites_a_claimed_version(store, testbed, s3_env, prefix):
    objects = store.objects
    assert objects.put(f"adapters/v9/{ADAPTER_CONFIG}", b'{"first": true}', if_absent=True)
    assert not objects.put(f"adapters/v9/{ADAPTER_CONFIG}", b'{"second": true}', if_absent=True)
    assert raw_get(testbed, s3_env.bucket, f"{prefix}/adapters/v9/{ADAPTER_CONFIG}") == (
        b'{"first": true}'
    )


def test_corrupted_adapter_file_is_detected_and_named(store, testbed, s3_env, prefix):
    store.publish_adapter(lora_adapter(), config(), training_round="t", round=1, sites={"a": 1})
    key = f"{prefix}/adapters/v1/{ADAPTER_WEIGHTS}"
    testbed.s3_client().put_object(Bucket=s3_env.bucket, Key=key, Body=b"not the adapter")
    with pytest.raises(CorruptObject) as caught:
        store.load_adapter(1)
    assert caught.value.key == key


def test_unknown_adapter_version_error_lists_the_available_ones(store):
    store.publish_adapter(lora_adapter(), config(), training_round="t", round=1, sites={"a": 1})
    with pytest.raises(AdapterVersionNotFound, match=r"v7 does not exist.*available: v1"):
        store.load_adapter(7)
    with pytest.raises(AdapterVersionNotFound, match="parent adapter version v5"):
        store.publish_adapter(lora_adapter(), config(), training_round="t", round=1,
                              sites={"a": 1}, parent_version=5)


def test_adapter_config_rank_must_match_the_adapter(store):
    with pytest.raises(ValueError, match="r 8 does not match the adapter's rank 4"):
        store.publish_adapter(lora_adapter(rank=4), config(rank=8), training_round="t", round=1,
                              sites={"a": 1})


def test_published_adapter_loads_with_peft_from_pretrained(store, testbed, s3_env, prefix,
                                                           tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the base model here is built, not downloaded
    import peft
    import torch
    import transformers

    def tiny_llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))

    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    trained = peft.get_peft_model(tiny_llama(), lora)
    state = {n: t.detach().numpy().copy() for n, t in peft.get_peft_model_state_dict(trained).items()}
    rng = np.random.default_rng(3)
    state = {n: rng.standard_normal(v.shape).astype(np.float32) for n, v in state.items()}

    store.publish_adapter(state, lora_adapter_config("tiny-llama", rank=4, alpha=8, dropout=0.0,
                                                     target_modules=["q_proj", "v_proj"]),
                          training_round="t", round=1, sites={"a": 1})
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        (tmp_path / name).write_bytes(raw_get(testbed, s3_env.bucket, f"{prefix}/adapters/v1/{name}"))

    # Every field peft's own LoraConfig writes, no more, no less (catches a peft upgrade).
    written = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert written.keys() == lora.to_dict().keys()

    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert loaded.peft_config["default"].r == 4
    assert loaded.peft_config["default"].lora_alpha == 8
    reloaded = peft.get_peft_model_state_dict(loaded)
    assert reloaded.keys() == state.keys()
    for name, values in state.items():
        np.testing.assert_array_equal(reloaded[name].detach().numpy(), values)


# ---- progress -----------------------------------------------------------------------------


def test_progress_is_rewritten_after_each_round(store):
    assert store.read_progress("notes-v1") is None
    for round_ in (1, 2):
        store.write_progress(RunProgress(
            training_round="notes-v1", round=round_, total_rounds=5,
            rounds=[{"round": r, "evalPerplexity": 20.0 - r} for r in range(1, round_ + 1)],
            sites={"hospital-a": {"state": "Training"}},
            last_checkpoint=f"checkpoints/notes-v1/round-{round_}/manifest.json",
        ))
    progress = store.read_progress("notes-v1")
    assert progress is not None and progress.round == 2 and progress.total_rounds == 5
    assert [r["round"] for r in progress.rounds] == [1, 2]
    assert progress.updated_at.endswith("Z")


# ---- outages ------------------------------------------------------------------------------


def test_s3_outage_is_retried_until_the_endpoint_answers_again(s3_env, prefix, store):
    port = free_port()  # nothing listens here yet: connection refused, like a down server
    proxy = TcpProxy(minio_port(s3_env), port)
    timer = proxy.start_after(3.0)
    try:
        patient = store_through(port, s3_env, prefix, deadline=30)
        started = time.monotonic()
        patient.save_checkpoint("notes-v1", checkpoint(4))
        waited = time.monotonic() - started
    finally:
        timer.cancel()
        proxy.stop()
    assert waited >= 2.5
    loaded = store.load_checkpoint("notes-v1")
    assert loaded is not None and loaded.round == 4


def test_s3_outage_longer_than_the_deadline_raises_naming_endpoint_and_key(s3_env, prefix):
    port = free_port()
    impatient = store_through(port, s3_env, prefix, deadline=1.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        impatient.write_progress(RunProgress(training_round="notes-v1", round=1, total_rounds=2))
    assert 1.5 <= time.monotonic() - started < 10
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert f"s3://{s3_env.bucket}/{prefix}/runs/notes-v1/progress.json" in message


# ---- pollinate-client eval ------------------------------------------------------------------


def test_pollinate_client_eval_scores_a_published_version_from_s3(
        store, s3_env, prefix, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A version trained on a site's text, published to S3, scored by `pollinate-client eval
    --adapter-version` on that text: the adapter's perplexity, as computed here, below the base
    model's."""
    import math
    import os
    import subprocess
    import sys

    from pollinate_runtime.train.data import load_eval_blocks, load_site_data
    from pollinate_runtime.train.local import LocalTrainingConfig, evaluate, train_round
    from pollinate_runtime.train.model import adapter_state, load_model
    from tiny_lm import CPU, SITE_MODULES, TINY_LORA, docstring_corpus

    data = tmp_path / "notes.txt"
    data.write_text("\n\n".join(docstring_corpus(SITE_MODULES)) + "\n")
    loaded = load_model(str(tiny_model_dir), TINY_LORA, CPU)
    base_loss, _ = evaluate(loaded.model, load_eval_blocks(data, loaded.tokenizer, 64))
    train_round(loaded.model, None, load_site_data(data, loaded.tokenizer, seq_len=64),
                LocalTrainingConfig(max_steps=30, batch_size=8, learning_rate=1e-2, seed=1,
                                    transport_dtype="float32"))
    adapter_loss, adapter_ppl = evaluate(loaded.model, load_eval_blocks(data, loaded.tokenizer, 64))
    version = store.publish_adapter(
        adapter_state(loaded.model, "float32"),
        lora_adapter_config(str(tiny_model_dir), rank=4, alpha=8.0, dropout=0.0,
                            target_modules=["q_proj", "v_proj"]),
        training_round="eval-test", round=1, sites={"site-a": 100}).version

    done = subprocess.run(
        [str(Path(sys.executable).parent / "pollinate-client"), "eval", "--s3-bucket", s3_env.bucket,
         "--s3-prefix", prefix, "--s3-endpoint", s3_env.endpoint, "--adapter-version", f"v{version}",
         "--data", str(data), "--device", "cpu", "--sequence-length", "64"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed["base_perplexity"] == pytest.approx(math.exp(base_loss), rel=1e-4)
    assert printed["adapter_loss"] == pytest.approx(adapter_loss, rel=1e-4)
    assert printed["adapter_perplexity"] == pytest.approx(adapter_ppl, rel=1e-4)
    assert printed["adapter_perplexity"] < printed["base_perplexity"]
