"""A base model stored under an s3:// prefix on the real S3 server (the testbed's MinIO) is
downloaded once into the Pollinate cache and loads like a local folder."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pollinate_runtime.train.device import DeviceChoice
from pollinate_runtime.train.model import (
    LoraSettings,
    ModelSourceError,
    load_model,
    resolve_model_source,
)
from pollinate_testbed import Testbed

# The tiny Llama recipe of the unit tests (tests/support: a config and a local tokenizer).
from tiny_lm import BASE_MODULES, build_tiny_llama, docstring_corpus, train_tokenizer

pytestmark = pytest.mark.cluster
CPU = DeviceChoice("cpu", "float32")
LORA = LoraSettings(rank=4, alpha=8, dropout=0.0)


@pytest.fixture
def s3_env(testbed: Testbed, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Testbed:
    for key, value in testbed.s3().env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("POLLINATE_CACHE", str(tmp_path / "cache"))
    return testbed


@pytest.fixture
def model_on_s3(s3_env: Testbed, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A tiny model folder uploaded under a fresh prefix; removed afterwards."""
    folder = tmp_path / "tiny"
    texts = docstring_corpus(BASE_MODULES)
    tokenizer = train_tokenizer(texts)
    build_tiny_llama(tokenizer, texts[:20]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    bucket = s3_env.s3().bucket
    prefix = f"test-models/{uuid.uuid4().hex[:8]}/tiny"
    client = s3_env.s3_client()
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
    yield f"s3://{bucket}/{prefix}/", folder
    for path in folder.iterdir():
        client.delete_object(Bucket=bucket, Key=f"{prefix}/{path.name}")


def test_a_model_under_an_s3_prefix_loads_like_the_local_folder(model_on_s3, caplog):
    uri, local = model_on_s3
    caplog.set_level(logging.INFO, logger="pollinate_runtime.train.sources")
    from_s3 = load_model(uri, LORA, CPU)
    from_disk = load_model(str(local), LORA, CPU)
    ids = torch.arange(1, 33).view(1, 32)
    from_s3.model.eval()
    from_disk.model.eval()
    with torch.no_grad():
        assert torch.equal(from_s3.model(ids).logits, from_disk.model(ids).logits)
    n_files = len(list(local.iterdir()))
    assert f"{n_files} of {n_files} files fetched" in caplog.text
    # A second site start finds every file unchanged in the cache.
    caplog.clear()
    assert resolve_model_source(uri) == from_s3.folder
    assert f"0 of {n_files} files fetched" in caplog.text


def test_an_empty_s3_prefix_is_a_clear_error(s3_env: Testbed):
    uri = f"s3://{s3_env.s3().bucket}/no-such-model-{uuid.uuid4().hex[:6]}/"
    with pytest.raises(ModelSourceError, match=f"base model {uri} .*holds no files"):
        resolve_model_source(uri)


def test_wrong_s3_credentials_are_a_clear_error(s3_env: Testbed, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    uri = f"s3://{s3_env.s3().bucket}/models/x/"
    with pytest.raises(ModelSourceError, match=r"cannot read base model s3://.* S3 said "
                                               r"SignatureDoesNotMatch"):
        resolve_model_source(uri)


@pytest.mark.parametrize("rest", ["sub/../../../escaped.txt", "a\\..\\..\\escaped.txt", "a//b.txt",
                                  ".pollinate-s3.json", "config.json.partial"])
def test_a_planted_key_that_would_leave_the_model_folder_is_refused_and_nothing_is_written(
        s3_env: Testbed, tmp_path: Path, rest: str):
    # Keys are the bucket's, untrusted. Either this S3 server refuses to store the key (MinIO
    # refuses '..' and empty segments; AWS stores them), or the download refuses it by name
    # before writing any file. unit/fuzz/test_fuzz_s3_model_keys.py covers every key shape.
    from botocore.exceptions import ClientError

    bucket = s3_env.s3().bucket
    prefix = f"test-models/{uuid.uuid4().hex[:8]}/planted/"
    client = s3_env.s3_client()
    client.put_object(Bucket=bucket, Key=f"{prefix}config.json", Body=b"{}")
    try:
        client.put_object(Bucket=bucket, Key=prefix + rest, Body=b"planted")
    except ClientError as err:
        assert err.response["Error"]["Code"] in ("XMinioInvalidResourceName", "XMinioInvalidObjectName")
        return
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
    assert prefix + rest in listed, listed
    cache = tmp_path / "cache"
    with pytest.raises(ModelSourceError, match=r"base model object .* cannot be stored"):
        resolve_model_source(f"s3://{bucket}/{prefix}")
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")], \
        "a file was written before the keys were checked"
    assert not list(tmp_path.rglob("escaped.txt"))
