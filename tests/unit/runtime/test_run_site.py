"""`join`'s SuperNode loop (cli.run_site) with a stand-in SuperNode: a small script that prints
what Flower's SuperNode prints at the ends site_session tells apart and exits as it does.
The loop's rules are site_session.Rejoin's (test_site_session.py); these check that the loop
starts, stops and gives up by them, and that a stop ends the site cleanly."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pollinate_runtime import cli, site_session


@pytest.fixture(autouse=True)
def handlers_restored() -> Iterator[None]:
    """run_site installs its own SIGTERM and SIGINT handlers, as `join` needs; put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_session, "RETRY_SECONDS", 0.05)


def stand_in(tmp_path: Path, ends: list[str]) -> list[str]:
    """A SuperNode whose n-th start prints ends[n] and exits 0 ("" = activate and stay up)."""
    script = tmp_path / "supernode.py"
    script.write_text(textwrap.dedent(f"""
        import pathlib, sys, time
        starts = pathlib.Path({str(tmp_path / "starts")!r})
        n = len(starts.read_text()) if starts.exists() else 0
        starts.write_text("x" * (n + 1))
        ends = {ends!r}
        end = ends[min(n, len(ends) - 1)]
        if end:
            print(end, flush=True)
            sys.exit(0)
        print("INFO :      SuperNode ID: 42", flush=True)
        time.sleep(120)
        """))
    return [sys.executable, str(script)]


def starts(tmp_path: Path) -> int:
    path = tmp_path / "starts"
    return len(path.read_text()) if path.exists() else 0


def site_args(rejoin_seconds: float = 0.0, reconnect_seconds: float = 0.0) -> argparse.Namespace:
    return argparse.Namespace(site="site-a", rejoin_seconds=rejoin_seconds,
                              reconnect_seconds=reconnect_seconds, verbose=False)


GAVE_UP = "ERROR :     Giving up reconnection after 5 attempts"
REFUSED = "ERROR :     Failed to activate SuperNode: No SuperNode found with the given public key"


def test_a_refused_key_past_the_rejoin_window_ends_the_join_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(cli.JoinError, match="rejected this site's key"):
        cli.run_site(site_args(rejoin_seconds=0), stand_in(tmp_path, [REFUSED]), dict(os.environ))
    assert starts(tmp_path) == 1


def test_a_lost_server_past_the_reconnect_window_ends_the_join_saying_so(tmp_path: Path) -> None:
    with pytest.raises(cli.JoinError, match="stopped answering"):
        cli.run_site(site_args(reconnect_seconds=0.3), stand_in(tmp_path, [GAVE_UP]), dict(os.environ))
    assert starts(tmp_path) >= 2, "a lost server is reconnected to before the window ends"


def test_a_stop_after_a_lost_server_ends_the_site_cleanly_once_it_is_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Twice lost, then the server is back and activates the site: the stop (SIGTERM, as a pod
    # or a person's Ctrl-C gives) ends the SuperNode and the join with 0.
    command = stand_in(tmp_path, [GAVE_UP, GAVE_UP, ""])

    def stop_once_up() -> None:
        while starts(tmp_path) < 3:
            threading.Event().wait(0.05)
        threading.Event().wait(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_once_up, daemon=True)
    stopper.start()
    with caplog.at_level(logging.INFO, logger="pollinate.client"):
        assert cli.run_site(site_args(), command, dict(os.environ)) == 0
    stopper.join(timeout=5)
    assert starts(tmp_path) == 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("the server stopped answering" in m for m in messages) == 2, messages
    assert messages.count("site site-a left the federation") == 1, messages
