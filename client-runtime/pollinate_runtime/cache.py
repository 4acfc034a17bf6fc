"""Pollinate's on-disk cache (`$POLLINATE_CACHE` or `~/.cache/pollinate`): converted models,
downloaded corpora. Entries are built under a lock and moved into place whole."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """`$POLLINATE_CACHE` or `~/.cache/pollinate`."""
    return Path(os.environ.get("POLLINATE_CACHE") or Path.home() / ".cache" / "pollinate")


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock: two site processes on one machine may build the same entry."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def publish(tmp: Path, target: Path) -> None:
    """Move a finished folder into place so readers never see a half-written one."""
    # mkdtemp makes the folder private, and some writers (safetensors) their files: other
    # users may read an entry (an image's pods run as another user than its build).
    tmp.chmod(0o755)
    for path in tmp.rglob("*"):
        if not path.is_symlink():  # a link's own mode means nothing; its target may be absent
            path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
