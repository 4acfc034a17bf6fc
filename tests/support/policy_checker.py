"""The policy checker the chart tests run: checkov, in a venv of its own under
~/.cache/pollinate/checkov-<hash of requirements/policy.lock>, built once per machine with the
uv that tools/env.sh installs (its pins would fight dev.lock's).

A venv is built in place and marked complete last; one found without the mark (a build killed
half-way, a full disk) is removed and built again, never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "policy.lock"
COMPLETE = ".complete"


def _cache() -> Path:
    return Path(os.environ.get("POLLINATE_CACHE", Path.home() / ".cache" / "pollinate"))


def _uv() -> list[str]:
    found = sorted(_cache().glob("uv-*/bin/uv"))
    return [str(found[-1])] if found else [sys.executable, "-m", "uv"]


def checkov() -> Path:
    """The checkov executable, built if this machine has none for today's lock."""
    key = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    home = _cache() / f"checkov-{key}"
    exe = home / "bin" / "checkov"
    if (home / COMPLETE).exists():
        return exe
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f"checkov-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another lane may be building it
        if (home / COMPLETE).exists():
            return exe
        shutil.rmtree(home, ignore_errors=True)  # half-built: never used
        uv = _uv()
        subprocess.run([*uv, "venv", "--quiet", "--python", sys.executable, str(home)], check=True)
        subprocess.run([*uv, "pip", "install", "--quiet", "--python", str(home / "bin" / "python"),
                        "--no-deps", "-r", str(LOCK)], check=True)
        (home / COMPLETE).write_text(key)
    return exe
