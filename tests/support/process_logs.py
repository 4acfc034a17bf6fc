"""The logs of the processes the tests started, so that a failing test can show their last
lines (tests/conftest.py): in CI the files are gone with the machine."""

from __future__ import annotations

import re
from pathlib import Path

STARTED: list[Path] = []

# Lines that say nothing about why a test failed: the operator's timers succeeding every
# second or two, and debug lines.
QUIET = re.compile(r"(Timer|Handler) '[^']*' succeeded|\bDEBUG\b")


def started(log: Path) -> None:
    if log not in STARTED:
        STARTED.append(log)


def written_since(when: float) -> list[Path]:
    """The started processes' logs written to since `when` (a Unix time): the processes of
    the current test, and of its module's fixtures that were still running."""
    return [log for log in STARTED if log.exists() and log.stat().st_mtime >= when]


def tail(text: str, lines: int) -> str:
    return "\n".join([line for line in text.splitlines() if not QUIET.search(line)][-lines:])
