"""Pollinate's Flower app bundle (FAB): the one bundle a site runs.

Starting a Flower run ships a FAB that every connected site installs and imports. Pollinate's
carries no code (the apps are installed with pollinate-runtime, in the images and on laptops)
and no run settings (they travel as the run's config overrides), so for one version of
Pollinate it is the same bytes everywhere: the operator sends it, and a site computes its
hash locally and refuses any run whose bundle has another (supernode.py).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tomllib
import zipfile

from . import __version__
from .run_config import flower_app_pyproject

ALLOWED_ENV = "POLLINATE_ALLOWED_APP_BUNDLES"
# A foreign bundle is read only to say what it claims to be; this much of it, no more.
MAX_DESCRIBED_BYTES = 1 << 20


@functools.cache
def app_bundle() -> bytes:
    """The FAB's bytes: built from Pollinate's pyproject with fixed timestamps (Flower's
    builder), so every build of one version is byte-identical."""
    from flwr.cli.build import build_fab_from_files

    content, _ = build_fab_from_files({"pyproject.toml": flower_app_pyproject().encode()})
    return content


def app_bundle_hash() -> str:
    return hashlib.sha256(app_bundle()).hexdigest()


def allowed_bundles(env: dict[str, str] | os._Environ[str]) -> frozenset[str]:
    """Pollinate's bundle, plus any a site's operator chose to allow as well (a comma list of
    sha256 hashes in ALLOWED_ENV, for a benchmark's stock app or a pinned fork)."""
    extra = set()
    for raw in env.get(ALLOWED_ENV, "").split(","):
        value = raw.strip().lower()
        if not value:
            continue
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError(f"{ALLOWED_ENV}: {raw.strip()[:80]!r} is not a sha256 hash (64 hex digits)")
        extra.add(value)
    return frozenset({app_bundle_hash(), *extra})


def describe(content: bytes) -> str:
    """What a bundle says it is (`name version`, from its pyproject), for an error message;
    the bundle is untrusted, so nothing in it is run and a malformed one is called so."""
    try:
        if len(content) > MAX_DESCRIBED_BYTES:
            return f"an app bundle of {len(content)} bytes"
        with zipfile.ZipFile(io.BytesIO(content)) as bundle:
            info = bundle.getinfo("pyproject.toml")
            if info.file_size > MAX_DESCRIBED_BYTES:
                return "an app bundle with an oversized pyproject.toml"
            project = tomllib.loads(bundle.read(info).decode()).get("project", {})
        name, version = str(project.get("name", "?"))[:60], str(project.get("version", "?"))[:30]
        return f"app {name!r} version {version!r}"
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return "an app bundle that is not a readable FAB"


def refusal(fab_hash: str, content: bytes) -> str:
    """The error a site gives for a run whose bundle is not one it runs."""
    return (f"this site runs only Pollinate's own client app (pollinate {__version__}, bundle "
            f"sha256 {app_bundle_hash()}); the run's bundle is {describe(content)}, sha256 "
            f"{fab_hash}: refused, nothing of it was installed or run")
