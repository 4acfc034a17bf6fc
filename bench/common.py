"""What every benchmark shares: the machine it ran on, timing, result files, tables, headlines.

A benchmark module exposes `NAME`, `run(mode, results_dir) -> dict` (it writes its own JSON
through `write_result`), `judge(result) -> headlines` (the verdicts from that JSON alone) and a
`main()` for running it on its own; `bench/run.py` lists the
modules. Modes: `tiny` (seconds, for tests), `quick` (minutes) and `full`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
MODES = ("tiny", "quick", "full")
MiB = 1 << 20


@dataclass(frozen=True)
class Headline:
    """One row of the README's results table: a measured figure beside its peer or limit."""

    benchmark: str
    case: str
    measured: str
    against: str
    ratio: str
    target: str
    met: bool | None  # None: no target for this row

    @property
    def verdict(self) -> str:
        return {True: "met", False: "missed", None: "-"}[self.met]


# ---- the machine ----------------------------------------------------------------------------


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: on a shared machine they tell noisy numbers apart."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{'+dirty' if dirty else ''}"


def machine_info() -> dict[str, Any]:
    import flwr
    import numpy
    import psutil

    memory = psutil.virtual_memory()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory.total / 2**30, 1),
        "memory_available_gib": round(memory.available / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else _package_version("flwr"),
        "git": _git_commit(),
        "load_average": load_average(),
    }


def _package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# ---- timing ---------------------------------------------------------------------------------


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls, in seconds: the least disturbed by other work."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


# ---- results --------------------------------------------------------------------------------


def write_result(name: str, mode: str, payload: dict[str, Any], results_dir: Path,
                 *, started: float, load_before: list[float]) -> dict[str, Any]:
    """Write `results_dir/<name>.json` with the machine, mode, timings and load; return it."""
    result = {
        "benchmark": name,
        "mode": mode,
        "command": f"python bench/{name}.py" + ("" if mode == "full" else f" --{mode}"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - started, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine": machine_info(),
        **payload,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    text = json.dumps(result, indent=2, default=_json_default)
    path.write_text(text + "\n")
    return json.loads(text)  # plain data, exactly what the file holds


def _json_default(value: object) -> object:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()  # type: ignore[attr-defined]
    if isinstance(value, Headline):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def headlines_of(result: dict[str, Any]) -> list[Headline]:
    return [Headline(**h) for h in result.get("headlines", [])]


# ---- output ---------------------------------------------------------------------------------


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A table: rich at a terminal, plain aligned text otherwise (logs, CI, pipes)."""
    cells = [[_cell(v) for v in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for column in columns:
            table.add_column(column, justify="right" if column != columns[0] else "left")
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w)
                        for i, (v, w) in enumerate(zip(row, widths, strict=True))))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e6:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"- {note}")


# ---- command line ---------------------------------------------------------------------------


def parse_mode(description: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`--quick` / `--tiny` (default: full) and `--results-dir`, shared by every benchmark."""
    parser = argparse.ArgumentParser(description=description)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="a few minutes: the smaller cases")
    size.add_argument("--tiny", action="store_const", dest="mode", const="tiny",
                      help="seconds: tiny inputs, to check the benchmark runs (tests)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help=f"where <name>.json goes (default {RESULTS_DIR.relative_to(REPO)})")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    args.mode = args.mode or "full"
    return args
