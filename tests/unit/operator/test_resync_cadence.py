"""When a timer tick runs a pass (handlers/level_triggered.timer_pass_due)."""

from __future__ import annotations

import pytest
from pollinate_operator.handlers.level_triggered import timer_pass_due
from pollinate_operator.settings import Settings

SETTINGS = Settings(resync_seconds=10, settled_resync_seconds=60)
SETTLED = ("Ready",)


def due(phase: str | None, since_last: float | None) -> bool:
    return timer_pass_due(phase, SETTLED, since_last, SETTINGS)


def test_the_first_tick_after_a_start_always_runs() -> None:
    assert due("Ready", None)
    assert due("Pending", None)


@pytest.mark.parametrize("phase", ["Pending", "Degraded", None])
def test_an_object_working_towards_something_is_checked_every_tick(phase: str | None) -> None:
    assert due(phase, 10.0)
    assert due(phase, 9.2)  # a tick that came a little early after an event-driven pass


def test_a_settled_object_is_checked_every_settled_interval() -> None:
    assert not due("Ready", 10.0)
    assert not due("Ready", 50.0)
    assert due("Ready", 57.0)  # the tick nearest the minute, even if it came a little early
    assert due("Ready", 70.0)


def test_a_pass_that_just_ran_for_an_event_pushes_the_next_tick_back() -> None:
    assert not due("Pending", 2.0)


def test_the_settled_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLLINATE_SETTLED_RESYNC_SECONDS", "120")
    assert Settings.from_env().settled_resync_seconds == 120
    monkeypatch.delenv("POLLINATE_SETTLED_RESYNC_SECONDS")
    assert Settings.from_env().settled_resync_seconds == 60
