"""What a site pod's probes see (pollinate_runtime.site_health): alive while join's heartbeat
is fresh, ready while its SuperNode is connected; each failure says why."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pollinate_runtime.site_health import HEALTH_FILE, STALE_SECONDS, SiteHealth, check, main


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_fresh_heartbeat_is_alive_and_ready_only_once_connected(tmp_path: Path) -> None:
    clock = Clock()
    health = SiteHealth(tmp_path, clock)
    health.update(supernode="starting", connected=False)
    assert check(tmp_path, ready=False, now=clock.now) == (True, "alive")
    ok, why = check(tmp_path, ready=True, now=clock.now)
    assert not ok and why == "not connected to the server: the SuperNode is starting"
    health.update(supernode="activated by the server", connected=True)
    assert check(tmp_path, ready=True, now=clock.now + 5) == (True, "connected")


def test_a_stale_heartbeat_fails_both_probes_saying_how_old(tmp_path: Path) -> None:
    clock = Clock()
    SiteHealth(tmp_path, clock).update(connected=True)
    for ready in (False, True):
        ok, why = check(tmp_path, ready, now=clock.now + STALE_SECONDS + 1)
        assert not ok and why.startswith("join's last heartbeat was 31 s ago")


def test_no_file_or_a_broken_one_fails_naming_the_file(tmp_path: Path) -> None:
    ok, why = check(tmp_path, ready=False, now=0.0)
    assert not ok and "no such file: pollinate-client join has not started" in why
    (tmp_path / HEALTH_FILE).write_text("{not json")
    ok, why = check(tmp_path, ready=False, now=0.0)
    assert not ok and "unreadable" in why


def test_the_heartbeat_thread_keeps_the_file_fresh_until_stopped(tmp_path: Path) -> None:
    clock = Clock()
    health = SiteHealth(tmp_path, clock)
    stop = threading.Event()
    thread = health.beat(stop, every=0.01)
    clock.now += 100
    # It writes again within a few beats with the clock's new time.
    for _ in range(500):
        path = tmp_path / HEALTH_FILE
        if path.exists() and json.loads(path.read_text())["updated"] == clock.now:
            break
        stop.wait(0.01)
    stop.set()
    thread.join(timeout=5)
    assert json.loads((tmp_path / HEALTH_FILE).read_text())["updated"] == clock.now


def test_the_command_exits_0_when_it_passes_and_1_with_the_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    SiteHealth(tmp_path).update(connected=False)
    assert main(["--work-dir", str(tmp_path)]) == 0
    assert main(["--work-dir", str(tmp_path), "--ready"]) == 1
    assert "not connected to the server" in capsys.readouterr().err


def test_readiness_follows_the_supernodes_activation_without_spinning(tmp_path: Path) -> None:
    import time

    from pollinate_runtime.cli import watch_activation

    health, activated, stopping = SiteHealth(tmp_path), threading.Event(), threading.Event()
    health.update(connected=False)
    thread = watch_activation(activated, health, stopping, every=0.01)

    def becomes(connected: bool) -> bool:
        for _ in range(500):
            if health.state.get("connected") is connected:
                return True
            time.sleep(0.01)
        return False

    activated.set()
    assert becomes(True)
    # Connected and staying so: the watcher sleeps between looks (a loop on the set event
    # would burn a core; this one takes a few checks in 0.3 s).
    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.15
    activated.clear()
    assert becomes(False)
    stopping.set()
    thread.join(timeout=5)
