"""The real operator as a process against the testbed, for tests that restart or kill it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pollinate_testbed import Testbed


class OperatorProcess:
    """The real operator (`pollinate-operator`) as a process against the testbed."""

    def __init__(self, bed: Testbed, log_path: Path, extra_env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.bed = bed
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.args = args or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, **self.bed.env(), "POLLINATE_RESYNC_SECONDS": "2",
               "POLLINATE_METRICS_PORT": "0", **self.extra_env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pollinate_operator", "--liveness", "", *self.args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
