"""pollinate-superlink: Flower's SuperLink whose SQLite state waits longer for a busy lock."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from flwr.supercore import sql_mixin
from flwr.supercore.object_store.sql_object_store import SqlObjectStore
from pollinate_runtime import superlink
from sqlalchemy import text

FLOWER_LOCK_WAIT_MS = 5000  # Flower 1.41's busy_timeout


def test_only_the_lock_wait_changes_and_it_is_never_shortened() -> None:
    pragmas = (("busy_timeout", "5000"), ("journal_mode", "WAL"))
    assert superlink.with_lock_wait(pragmas, 20_000) == (("busy_timeout", "20000"), ("journal_mode", "WAL"))
    assert superlink.with_lock_wait((("busy_timeout", "90000"),), 20_000) == (("busy_timeout", "90000"),)


def test_a_flower_that_no_longer_sets_the_lock_wait_is_named() -> None:
    with pytest.raises(RuntimeError, match="no longer set busy_timeout"):
        superlink.with_lock_wait((("journal_mode", "WAL"),), 20_000)
    with pytest.raises(RuntimeError, match="no longer reads SQLITE_PRAGMAS"):
        superlink.lengthen_lock_wait(types.ModuleType("moved"))


def test_the_pinned_flower_still_waits_5_s_for_its_lock() -> None:
    # What this module is for: if Flower raises it itself, the wrapper may go.
    assert dict(sql_mixin.SQLITE_PRAGMAS)["busy_timeout"] == str(FLOWER_LOCK_WAIT_MS)


def lock_wait_of(store: SqlObjectStore) -> int:
    with store._engine.connect() as connection:  # Flower keeps no public handle on it
        return int(connection.execute(text("PRAGMA busy_timeout")).scalar_one())


def test_flowers_own_state_opens_its_connections_with_the_longer_wait(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # restored after
    store = SqlObjectStore(str(tmp_path / "state.db"))
    store.initialize()
    assert lock_wait_of(store) == FLOWER_LOCK_WAIT_MS

    superlink.lengthen_lock_wait(sql_mixin)
    store = SqlObjectStore(str(tmp_path / "state.db"))
    store.initialize()
    assert lock_wait_of(store) == superlink.LOCK_WAIT_MS


@pytest.mark.slow  # holds a SQLite lock for 6.5 s
def test_a_write_outlasts_a_lock_held_longer_than_flowers_wait(tmp_path: Path, monkeypatch) -> None:
    """The failure seen in CI: another writer holds the lock past 5 s; the SuperLink's write
    waits for it instead of failing with 'database is locked'."""
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)
    superlink.lengthen_lock_wait(sql_mixin)
    store = SqlObjectStore(str(tmp_path / "state.db"))
    store.initialize()

    holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock
    held_for = FLOWER_LOCK_WAIT_MS / 1000 + 1.5
    release = threading.Timer(held_for, holder.execute, args=("COMMIT",))
    release.start()
    try:
        start = time.monotonic()
        with store._engine.begin() as connection:
            connection.execute(text("CREATE TABLE probe (x INTEGER)"))
        waited = time.monotonic() - start
    finally:
        release.join()
        holder.close()
    assert waited >= held_for - 0.5, waited


@pytest.mark.slow  # starts a Python process with Flower's imports
def test_the_command_is_flowers_superlink() -> None:
    result = subprocess.run([sys.executable, "-m", "pollinate_runtime.superlink", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: flower-superlink"), result.stdout[:200]
    assert "--database" in result.stdout


@pytest.mark.slow  # starts a Python process with Flower's imports
def test_the_command_opens_flowers_state_with_the_longer_wait() -> None:
    # main() as the console script runs it, with Flower's server swapped for a probe that
    # reports the SQLite settings the server's state would be opened with.
    probe = ("import flwr.superlink.cli as cli\n"
             "from flwr.supercore import sql_mixin\n"
             "cli.flower_superlink = lambda: print(dict(sql_mixin.SQLITE_PRAGMAS)['busy_timeout'])\n"
             "from pollinate_runtime import superlink\n"
             "superlink.main()\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(superlink.LOCK_WAIT_MS)


# ---- a ServerApp process slow to start -----------------------------------------------------


@pytest.fixture
def server_tasks(monkeypatch, tmp_path: Path):
    """Flower's own SQL task state (what the SuperLink's extends), on a clock the test moves;
    the class patch is undone afterwards."""
    from datetime import UTC, datetime, timedelta

    from flwr.supercore.corestate import sql_corestate
    from flwr.supercore.object_store import ObjectStoreFactory

    class TaskState(sql_corestate.SqlCoreState):  # the two methods only messages need
        def get_node_id(self) -> int:
            return 0

        def store_message_and_object_tree(self, *args, **kwargs):
            raise NotImplementedError

    clock = {"at": datetime(2026, 12, 7, tzinfo=UTC)}
    monkeypatch.setattr(sql_corestate, "now", lambda: clock["at"])
    monkeypatch.setattr(sql_corestate.SqlCoreState, "claim_task", sql_corestate.SqlCoreState.claim_task)
    state = TaskState(str(tmp_path / "state.db"), ObjectStoreFactory().store())
    state.initialize()

    def advance(seconds: float) -> None:
        clock["at"] += timedelta(seconds=seconds)

    def claim() -> str:
        token = state.claim_task(state.create_task(task_type="flwr-serverapp", run_id=1, fab_hash="f"))
        assert token is not None
        return token

    return state, claim, advance, sql_corestate


def test_flower_gives_a_claimed_serverapp_30_s_to_start(server_tasks) -> None:
    # What patient_claims is for: if Flower waits longer itself, the patch may go.
    state, claim, advance, _ = server_tasks
    token = claim()
    advance(29)
    assert state.get_task_by_token(token) is not None
    advance(2)
    assert state.get_task_by_token(token) is None


def test_a_serverapp_slow_to_start_keeps_its_claim_for_two_minutes(server_tasks) -> None:
    state, claim, advance, module = server_tasks
    superlink.patient_claims(module)
    superlink.patient_claims(module)  # once is enough: not wrapped twice
    token = claim()
    advance(superlink.CLAIM_START_SECONDS - 5)
    task = state.get_task_by_token(token)
    assert task is not None
    # Once it has started, a ServerApp that goes quiet is given up on as Flower does.
    assert state.activate_task(task.task_id)
    advance(61)
    assert state.get_task_by_token(token) is None


def test_patient_claims_refuses_a_flower_whose_task_state_moved() -> None:
    with pytest.raises(RuntimeError, match="no longer claims tasks"):
        superlink.patient_claims(types.ModuleType("moved"))
