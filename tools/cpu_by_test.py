"""Where the test suite's CPU goes, per test: `python tools/cpu_by_test.py OUT -- make test`.

Runs the command with POLLINATE_TEST_TRACE set (tests/conftest.py notes which test each pytest
process starts, and when), samples every process's CPU time from /proc twice a second, charges
each process's CPU to the test its nearest pytest ancestor was running at the time, and writes
OUT (a table: CPU seconds per test and per module, slowest first; the rest of the machine's
processes as "outside any test"). The machine is CPU-bound under `make test`: a test's CPU, not
its wall time, is what it costs the others running beside it.
"""

from __future__ import annotations

import bisect
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
INTERVAL = 0.5


def processes() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, start time, CPU seconds) of every process."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(name)] = (int(fields[1]), fields[19], (int(fields[11]) + int(fields[12])) / TICK)
    return found


def command(pid: int) -> str:
    """A short name for a process no test owns (a daemon reparented to init, say)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    words = [os.path.basename(a.decode(errors="replace")) for a in argv[:3] if a]
    if len(words) > 1 and words[1] == "-m":
        words = words[:3]
    elif len(words) > 1 and words[1].startswith("-"):
        words = words[:1]
    return " ".join(words[:2])[:60]


class Trace:
    """The trace file: per pytest pid, the tests it started and when."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.starts: dict[int, list[tuple[float, str]]] = defaultdict(list)
        self.offset = 0

    def refresh(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            for line in f:
                if line.endswith("\n"):
                    when, pid, nodeid = line.split(" ", 2)
                    self.starts[int(pid)].append((float(when), nodeid.strip()))
                    self.offset += len(line.encode())

    def test_at(self, pid: int, when: float) -> str | None:
        starts = self.starts[pid]
        i = bisect.bisect_right(starts, (when, "\uffff")) - 1
        return starts[i][1] if i >= 0 else None


def sample(trace: Trace, stop: threading.Event) -> dict[str, float]:
    charged: dict[str, float] = defaultdict(float)
    last: dict[tuple[int, str], float] = {}
    first = True
    while not stop.is_set():
        now = time.time()
        trace.refresh()
        procs = processes()
        for pid, (_, start, cpu) in procs.items():
            key = (pid, start)
            delta = cpu - last.get(key, cpu if first else 0.0)
            last[key] = cpu
            if delta <= 0:
                continue
            owner, test, seen = pid, None, 0
            while owner in procs and seen < 64:
                if trace.starts.get(owner):
                    test = trace.test_at(owner, now) or "(collection)"
                    break
                owner, seen = procs[owner][0], seen + 1
            charged[test or f"(outside any test) {command(pid)}"] += delta
        first = False
        stop.wait(INTERVAL)
    return charged


def report(charged: dict[str, float]) -> str:
    modules: dict[str, float] = defaultdict(float)
    for test, cpu in charged.items():
        modules[test.split("::", 1)[0]] += cpu
    total = sum(charged.values())
    lines = [f"{total:9.1f} s CPU in all", "", "per module:"]
    lines += [f"{cpu:9.1f} s  {name}" for name, cpu in sorted(modules.items(), key=lambda kv: -kv[1])]
    lines += ["", "per test:"]
    lines += [f"{cpu:9.1f} s  {name}" for name, cpu in sorted(charged.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    out, command = Path(argv[0]), argv[2:]
    trace = Path(tempfile.mkstemp(prefix="pollinate-test-trace.")[1])
    stop = threading.Event()
    result: dict[str, float] = {}
    sampler = threading.Thread(target=lambda: result.update(sample(Trace(trace), stop)), daemon=True)
    sampler.start()
    code = subprocess.call(command, env={**os.environ, "POLLINATE_TEST_TRACE": str(trace)})
    stop.set()
    sampler.join()
    out.write_text(report(result))
    print(f"CPU per test written to {out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
