"""Small helpers for tests that drive the testbed: kubectl with parsed output, and waiting."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

from .cluster import Testbed

T = TypeVar("T")


class Kubectl:
    """The real kubectl against the testbed, optionally bound to a namespace."""

    def __init__(self, bed: Testbed, namespace: str | None = None) -> None:
        self.bed = bed
        self.namespace = namespace

    def run(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        ns = ["-n", self.namespace] if self.namespace else []
        result = subprocess.run(
            [str(self.bed.bin_dir / "kubectl"), f"--kubeconfig={self.bed.kubeconfig}", *ns, *args],
            input=input, capture_output=True, text=True, check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def apply(self, manifest: str) -> str:
        return self.run("apply", "-f", "-", input=manifest).stdout


def eventually(probe: Callable[[], T | None], timeout: float = 60, interval: float = 0.5,
               what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
