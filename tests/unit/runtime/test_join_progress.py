"""What `pollinate-client join` shows while it trains: a progress bar per round at a terminal,
plain log lines in a pod."""

from __future__ import annotations

import io
import logging
import re

import pytest
from pollinate_runtime.cli import Reporter


class Terminal(io.StringIO):
    """What a person's terminal looks like to the reporter."""

    def isatty(self) -> bool:
        return True


def one_round(reporter: Reporter, steps: int = 8) -> None:
    reporter("training", {"round": 3})
    for step in range(1, steps + 1):
        reporter("step", {"round": 3, "step": step, "steps": steps, "loss": 2.0 - step / 10})
    reporter("trained", {"round": 3, "loss": 1.55, "seconds": 4.2})


def test_at_a_terminal_each_round_draws_a_progress_bar_of_its_local_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TERM", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    screen = Terminal()
    reporter = Reporter("alice-laptop", stream=screen)
    assert reporter.interactive
    one_round(reporter)
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # colours, cursor moves
    assert "alice-laptop round 3" in drawn
    assert "8/8" in drawn and "━" in drawn  # the bar, full at the end of the round
    assert "loss 1.2000" in drawn  # the last step's loss
    assert "round 3: done, train loss 1.5500" in drawn


def test_a_bar_left_by_a_failed_round_is_closed_when_the_next_one_starts() -> None:
    reporter = Reporter("alice-laptop", stream=Terminal())
    reporter("training", {"round": 1})
    reporter("step", {"round": 1, "step": 1, "steps": 4, "loss": 3.0})
    first = reporter._bar
    reporter("training", {"round": 2})
    assert first is not None and not first.live.is_started
    assert reporter._bar is not first
    reporter("trained", {"round": 2, "loss": 1.0, "seconds": 1.0})
    assert reporter._bar is None


def test_in_a_pod_rounds_are_plain_log_lines_without_a_bar(caplog: pytest.LogCaptureFixture) -> None:
    log_file = io.StringIO()  # a pod's stderr is a pipe, not a terminal
    reporter = Reporter("hospital-a", stream=log_file)
    assert not reporter.interactive
    with caplog.at_level(logging.INFO, logger="pollinate.client"):
        one_round(reporter)
    assert [r.getMessage() for r in caplog.records] == [
        "round 3: training on local data",
        "round 3: done, train loss 1.5500, 4.2 s; adapter sent",
    ]
    assert log_file.getvalue() == ""  # nothing drawn: no escape codes in the pod's log
    assert reporter._bar is None
