"""What `pollinate-client join` tells its pod's probes, through a small file in its work folder.

`join` rewrites `<work-dir>/health.json` every `BEAT_SECONDS` from a thread of its own, and
on every change of its SuperNode (started, activated by the server, ended). `pollinate-client
health --work-dir W` reads it: alive while the heartbeat is fresh (a join process that is gone
or frozen is restarted), and with `--ready`, ready while a SuperNode the server activated is
running (`kubectl get pods` then shows which sites take part).

Probes run this every few seconds in every site pod, so it imports nothing but the standard
library: `pollinate-client health` is dispatched here before the CLI's own imports (flwr,
torch) would cost half a second of CPU each time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

HEALTH_FILE = "health.json"
BEAT_SECONDS = 10.0
# Three missed beats: a loaded node may delay one.
STALE_SECONDS = 3 * BEAT_SECONDS


class SiteHealth:
    """The state join reports, written atomically (a probe never reads half a file)."""

    def __init__(self, work: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = work / HEALTH_FILE
        self.clock = clock
        self.state: dict[str, object] = {"supernode": "starting", "connected": False}
        self._lock = threading.Lock()

    def update(self, **changes: object) -> None:
        with self._lock:
            self.state.update(changes)
            self._write()

    def _write(self) -> None:
        body = {**self.state, "pid": os.getpid(), "updated": self.clock()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(self.path)

    def beat(self, stop: threading.Event, every: float = BEAT_SECONDS) -> threading.Thread:
        def run() -> None:
            while True:
                with self._lock:
                    self._write()
                if stop.wait(every):
                    return

        thread = threading.Thread(target=run, name="site-health", daemon=True)
        thread.start()
        return thread


def check(work: Path, ready: bool, now: float, stale_seconds: float = STALE_SECONDS) -> tuple[bool, str]:
    """Whether the probe passes, and a line saying why (the kubelet shows it in Events)."""
    path = work / HEALTH_FILE
    try:
        state = json.loads(path.read_text())
        updated = float(state["updated"])
    except FileNotFoundError:
        return False, f"{path}: no such file: pollinate-client join has not started in {work}"
    except (ValueError, KeyError, TypeError) as err:
        return False, f"{path}: unreadable ({err})"
    age = now - updated
    if age > stale_seconds:
        return False, f"join's last heartbeat was {age:.0f} s ago (more than {stale_seconds:.0f} s)"
    if ready and not state.get("connected"):
        return False, f"not connected to the server: the SuperNode is {state.get('supernode', 'unknown')}"
    return True, "connected" if state.get("connected") else "alive"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pollinate-client health",
                                     description="exit 0 if this site's join is alive (--ready: connected)")
    parser.add_argument("--work-dir", default=os.environ.get("POLLINATE_WORK_DIR", "~/.cache/pollinate/site"),
                        help="join's --work-dir")
    parser.add_argument("--ready", action="store_true", help="also require a connected SuperNode")
    args = parser.parse_args(argv)
    ok, why = check(Path(args.work_dir).expanduser(), args.ready, time.time())
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def entry() -> int:
    """`pollinate-client`: `health` here, with nothing heavy imported; the rest in cli."""
    if sys.argv[1:2] == ["health"]:
        return main(sys.argv[2:])
    from .cli import main as cli_main

    return cli_main()
