"""When a timer tick runs a pass (handlers/level_triggered.timer_pass_due), and which objects
count as settled (reconcile.*.settled)."""

from __future__ import annotations

import time

import kopf
import pytest
from pollinate_operator.handlers.level_triggered import on_tick, timer_pass_due
from pollinate_operator.reconcile import federation, traininground
from pollinate_operator.settings import Settings

SETTINGS = Settings(resync_seconds=10, settled_resync_seconds=60)


def due(settled: bool, since_last: float | None) -> bool:
    return timer_pass_due(settled, since_last, SETTINGS)


def test_the_first_tick_after_a_start_always_runs() -> None:
    assert due(True, None)
    assert due(False, None)


def test_an_object_working_towards_something_is_checked_every_tick() -> None:
    assert due(False, 10.0)
    assert due(False, 9.2)  # a tick that came a little early after an event-driven pass


def test_a_settled_object_is_checked_every_settled_interval() -> None:
    assert not due(True, 10.0)
    assert not due(True, 50.0)
    assert due(True, 57.0)  # the tick nearest the minute, even if it came a little early
    assert due(True, 70.0)


def test_a_pass_that_just_ran_for_an_event_pushes_the_next_tick_back() -> None:
    assert not due(False, 2.0)


def test_the_settled_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLLINATE_SETTLED_RESYNC_SECONDS", "120")
    assert Settings.from_env().settled_resync_seconds == 120
    monkeypatch.delenv("POLLINATE_SETTLED_RESYNC_SECONDS")
    assert Settings.from_env().settled_resync_seconds == 60


def condition(kind: str, status: str) -> dict:
    return {"type": kind, "status": status}


def test_a_ready_federation_with_nothing_to_confirm_is_settled() -> None:
    assert federation.settled({"phase": "Ready", "conditions": [condition("Ready", "True"),
                                                                 condition("Progressing", "False")]})


@pytest.mark.parametrize("status", [
    {},
    {"phase": "Pending"},
    {"phase": "Degraded"},
    # Ready on the last word of a server that did not answer (it may have restarted and
    # forgotten the keys): checked again at the active cadence.
    {"phase": "Ready", "conditions": [condition("Progressing", "True")]},
])
def test_a_federation_still_working_or_unconfirmed_is_not_settled(status: dict) -> None:
    assert not federation.settled(status)


@pytest.mark.parametrize(("phase", "expected"), [
    ("Succeeded", True), ("Failed", True), ("Suspended", True),
    ("Pending", False), ("Running", False), (None, False),
])
def test_a_training_round_is_settled_when_finished_or_suspended(phase: str | None, expected: bool) -> None:
    assert traininground.settled({"phase": phase} if phase else {}) is expected


def ticks(status: dict, seconds_since_last_pass: float | None) -> int:
    """How many passes one timer tick runs for an object with this stored status."""
    passes: list[str] = []
    tick = on_tick(lambda **kw: passes.append(kw["name"]), federation.settled, SETTINGS)
    memo = kopf.Memo()
    if seconds_since_last_pass is not None:
        memo["last_pass"] = time.monotonic() - seconds_since_last_pass
    tick(name="clinical-notes", namespace="research", body=kopf.Body({"status": status}),
         patch=kopf.Patch(), memo=memo, logger=None)
    return len(passes)


def test_the_timer_skips_a_settled_object_between_settled_passes() -> None:
    ready = {"phase": "Ready", "conditions": [condition("Progressing", "False")]}
    assert ticks(ready, None) == 1  # first tick after the operator started
    assert ticks(ready, 10.0) == 0
    assert ticks(ready, 61.0) == 1
    assert ticks({"phase": "Pending"}, 10.0) == 1
