"""The versions requirements/dev.lock pins, by canonical package name (the images and the
laptop install are checked against them)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from packaging.utils import canonicalize_name

LOCK = Path(__file__).resolve().parents[2] / "requirements" / "dev.lock"


@cache
def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins
