"""Flower's SuperLink with room for a busy round: `pollinate-superlink <flower-superlink flags>`
is `flower-superlink` with a longer wait for its database lock.

Flower 1.41 keeps the SuperLink's state (nodes, runs, messages and their objects) in SQLite
and gives up on a lock after 5 s (`busy_timeout`). When every site of a round replies at
once on a loaded server, a write can wait longer than that (CI's two cores, sixteen sites
replying, one reply 32 MB): the SuperLink then answers the site's push with
`500 database is locked`, Flower's SuperNode does not retry a 500 and drops the reply, and
the round waits out its timeout for a site that did its work.

Here a write waits up to `LOCK_WAIT_MS` for the lock: long enough to ride out a burst, and
shorter than the 30 s a SuperNode waits for an answer before it sends the request again (a
second push of a reply still being stored). Waiting costs nothing when there is no contention.
Only Flower's table of SQLite settings changes; `flwr` is pinned to 1.41 and
`tests/unit/runtime/test_superlink.py` fails if that table moves.
"""

from __future__ import annotations

import sys
from types import ModuleType

LOCK_WAIT_MS = 20_000
BUSY_TIMEOUT = "busy_timeout"


def with_lock_wait(pragmas: tuple[tuple[str, str], ...], wait_ms: int) -> tuple[tuple[str, str], ...]:
    """`pragmas` with SQLite's busy_timeout set to `wait_ms` (never shortened)."""
    names = [name for name, _ in pragmas]
    if BUSY_TIMEOUT not in names:
        raise RuntimeError(f"Flower's SQLite settings no longer set {BUSY_TIMEOUT}: {names}; "
                           "check the pinned flwr version")
    return tuple((name, str(max(wait_ms, int(value))) if name == BUSY_TIMEOUT else value)
                 for name, value in pragmas)


def lengthen_lock_wait(sql_module: ModuleType, wait_ms: int = LOCK_WAIT_MS) -> None:
    """Give every SQLite connection Flower's `sql_module` opens from now on `wait_ms` of lock wait."""
    pragmas = getattr(sql_module, "SQLITE_PRAGMAS", None)
    if not isinstance(pragmas, tuple):
        raise RuntimeError(f"{sql_module.__name__} no longer reads SQLITE_PRAGMAS; "
                           "check the pinned flwr version")
    sql_module.SQLITE_PRAGMAS = with_lock_wait(pragmas, wait_ms)  # type: ignore[attr-defined]


def main() -> None:
    from flwr.supercore import sql_mixin
    from flwr.superlink.cli import flower_superlink

    lengthen_lock_wait(sql_mixin)
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
