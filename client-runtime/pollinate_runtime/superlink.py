"""Flower's SuperLink, gated and with room for a busy round: `pollinate-superlink
<flower-superlink flags>` is `flower-superlink` behind Pollinate's gate (`server_gate`: the
control API only for the operator's token, named by the file in $POLLINATE_CONTROL_TOKEN_FILE;
the runtime API only for the server's own processes) and with a longer wait for its database
lock, and with two minutes for a claimed ServerApp process to start (`patient_claims`).

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

import os
import sys
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

from . import server_metrics
from .server_gate import CONTROL_TOKEN_FILE_ENV, ServerGate

# How long a claimed task's process has to start: the same for the server's ServerApp as for a
# site's ClientApp.
from .supernode import CLAIM_START_SECONDS

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


def put_behind_gate(main_module: ModuleType, token_file: Path | None) -> None:
    """Make Flower's `main_module.create_app` return its app behind `ServerGate`."""
    create_app = getattr(main_module, "create_app", None)
    if not callable(create_app):
        raise RuntimeError(f"{main_module.__name__} no longer has create_app; "
                           "check the pinned flwr version")

    def gated_create_app(*args: object, **kwargs: object) -> ServerGate:
        return ServerGate(create_app(*args, **kwargs), token_file)

    main_module.create_app = gated_create_app  # type: ignore[attr-defined]


def patient_claims(state_module: ModuleType, seconds: float = CLAIM_START_SECONDS) -> None:
    """Have Flower's SQL task state (`state_module.SqlCoreState`, which the SuperLink's state
    extends) give a claimed task `seconds` to start, not Flower's 30 s.

    The SuperLink runs each run's ServerApp as a task: a new Python process that must call in
    within 30 s of its claim, or its token lapses and the task is handed to another process.
    On a loaded server (seen in CI: three test lanes on two cores) starting Python and
    importing Flower and the server app took longer: every attempt was refused (401) and the
    run never started. The sites' side has the same patch (supernode.patient_claims)."""
    state_cls = getattr(state_module, "SqlCoreState", None)
    original = getattr(state_cls, "claim_task", None)
    needed = ("TaskModel", "update", "uint64_to_int64", "now")
    if original is None or not all(hasattr(state_module, name) for name in needed):
        raise RuntimeError(f"{state_module.__name__} no longer claims tasks as this expects; "
                           "check the pinned flwr version")
    if getattr(original, "patient_seconds", None) is not None:
        return
    task = state_module.TaskModel

    def claim_task(self: Any, task_id: int) -> str | None:
        token = original(self, task_id)
        if token is not None:
            with self.session() as session:
                session.execute(
                    state_module.update(task)
                    .where(task.task_id == state_module.uint64_to_int64(task_id), task.token == token)
                    .values(active_until=state_module.now() + timedelta(seconds=seconds)))
        return token

    claim_task.patient_seconds = seconds  # type: ignore[attr-defined]
    state_cls.claim_task = claim_task  # type: ignore[attr-defined]


def control_token_file(env: dict[str, str] | os._Environ[str]) -> Path | None:
    value = env.get(CONTROL_TOKEN_FILE_ENV, "").strip()
    return Path(value) if value else None


def main() -> None:
    from flwr.supercore import sql_mixin
    from flwr.supercore.corestate import sql_corestate
    from flwr.superlink import main as superlink_app
    from flwr.superlink.cli import flower_superlink

    token_file = control_token_file(os.environ)
    if token_file is None:
        # Not fatal: the server still serves sites; it only has no operator to obey.
        print(f"pollinate-superlink: {CONTROL_TOKEN_FILE_ENV} is not set: every control call "
              "(start or stop a run, register a site key) will be refused", file=sys.stderr)
    try:
        server_metrics.serve(os.environ)
    except (ValueError, OSError) as err:
        sys.exit(f"pollinate-superlink: cannot serve metrics: {err}")
    put_behind_gate(superlink_app, token_file)
    lengthen_lock_wait(sql_mixin)
    patient_claims(sql_corestate)
    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
