"""Run the benchmarks and write bench/results/summary.md, the table the README includes.

    python bench/run.py --quick             # minutes
    python bench/run.py                     # the full set (make bench)
    python bench/run.py --only wire_bytes   # some of them
    python bench/run.py --from-results      # no run: summary.md from the JSONs already there
    ... --readme                            # also put the summary into README.md

A benchmark is a module in bench/ with NAME, run(mode, results_dir) -> result dict (its JSON,
with "headlines"), judge(result) -> its headlines from that dict, and main(); adding one is
adding its name to BENCHMARKS. `--from-results` judges the stored measurements again with the
code as it is now (targets and verdicts change with the code; measurements only with a run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import REPO, headlines_of, parse_mode

BENCHMARKS = (
    "aggregation",
    "wire_bytes",
    "operator_scale",
    "round_overhead",
    "learning_quality",
)


# The whole run's timing (the "make bench in under an hour"), beside the results.
RUN_RECORD = "run.json"
HOUR = 3600.0

README_BEGIN = "<!-- bench summary: begin (python bench/run.py --readme) -->"
README_END = "<!-- bench summary: end -->"


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--from-results", action="store_true",
                        help="run nothing: summarise the result JSONs already in --results-dir")
    parser.add_argument("--readme", action="store_true",
                        help="also replace the summary between the markers in README.md")


def splice_readme(readme: str, summary: str) -> str:
    """README text with `summary` between the bench markers (which must be there)."""
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError(f"README.md lacks the markers {README_BEGIN!r} and {README_END!r}")
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    body = summary.split("\n", 2)[2].strip()  # without the summary's own title
    return f"{head}{README_BEGIN}\n{body}\n{README_END}{tail}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def run_line(record: dict[str, Any]) -> str:
    """One sentence on the last whole run: its command, how long, and which part took what."""
    parts = ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in record["seconds"].items())
    failed = f"; failed: {', '.join(record['failures'])}" if record.get("failures") else ""
    within = "within" if record["wall_seconds"] < HOUR else "over"
    return (f"The last whole run, `{record['command']}`, took {record['wall_seconds'] / 60:.1f} min "
            f"({within} the hour), finished {record['finished']}: {parts}{failed}.")


def write_run_record(results_dir: Path, command: str, mode: str, seconds: dict[str, float],
                     failures: dict[str, str], wall: float) -> dict[str, Any]:
    record = {"command": command, "mode": mode,
              "finished": datetime.now(UTC).isoformat(timespec="seconds"),
              "wall_seconds": round(wall, 1), "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "failures": failures}
    (results_dir / RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return record


def rejudged(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """`result` with its headlines judged by the benchmark's current code."""
    heads = importlib.import_module(name).judge(result)
    return {**result, "headlines": [asdict(h) for h in heads]}


def summary_markdown(results: list[dict[str, Any]], failures: dict[str, str], command: str,
                     run: dict[str, Any] | None = None) -> str:
    lines = ["# Benchmark results", "", f"Made by `{command}`.", ""]
    if run:
        lines += [run_line(run), ""]
    if results:
        machine = results[0]["machine"]
        lines += [f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
                  f"Python {machine['python']}, numpy {machine['numpy']}, flwr {machine['flwr']}; "
                  f"git {machine['git']}.", ""]
    lines += ["| benchmark | case | measured | against | ratio | target | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for h in headlines_of(result):
            lines.append("| " + " | ".join(_cell(c) for c in (
                h.benchmark, h.case, h.measured, h.against, h.ratio, h.target, h.verdict)) + " |")
    lines += ["", "| benchmark | command | finished | wall s | load average before -> after |",
              "| --- | --- | --- | --- | --- |"]
    for result in results:
        lines.append(f"| {result['benchmark']} | `{result['command']}` | {result['finished']} | "
                     f"{result['wall_seconds']} | {result['load_average_before']} -> "
                     f"{result['load_average_after']} |")
    for name, error in failures.items():
        lines.append(f"| {name} | failed: {_cell(error)} | | | |")
    lines += ["", "Every case, and why a target is missed, is in `bench/results/<benchmark>.json` "
              "(`notes`); `python bench/<benchmark>.py [--quick]` runs one benchmark.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_mode(__doc__.splitlines()[0], argv, extra=_options)
    results, failures = [], {}
    names = args.only or BENCHMARKS
    run = None
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.from_results:
        for name in names:
            path = args.results_dir / f"{name}.json"
            if path.exists():
                results.append(rejudged(name, json.loads(path.read_text())))
        command = "each benchmark's own command (second table), from its JSON in bench/results/"
        record = args.results_dir / RUN_RECORD
        run = json.loads(record.read_text()) if record.exists() else None
    else:
        seconds: dict[str, float] = {}
        started = time.monotonic()
        for name in names:
            print(f"\n=== {name} ({args.mode}) ===", flush=True)
            began = time.monotonic()
            try:
                results.append(importlib.import_module(name).run(args.mode, args.results_dir))
            except Exception as err:  # one broken benchmark must not hide the others' results
                traceback.print_exc()
                failures[name] = f"{type(err).__name__}: {err}"[:300]
            seconds[name] = time.monotonic() - began
        command = "python bench/run.py" + ("" if args.mode == "full" else f" --{args.mode}")
        if args.only:
            command += " --only " + " ".join(args.only)
        wall = time.monotonic() - started
        print(f"\n{len(names)} benchmarks in {wall / 60:.1f} min", flush=True)
        if not args.only:  # only a whole run says how long the whole takes
            run = write_run_record(args.results_dir, command, args.mode, seconds, failures, wall)
    summary = args.results_dir / "summary.md"
    text = summary_markdown(results, failures, command, run)
    summary.write_text(text)
    shown = summary.relative_to(REPO) if summary.is_relative_to(REPO) else summary
    print(f"\nwrote {shown}")
    if args.readme:
        readme = REPO / "README.md"
        readme.write_text(splice_readme(readme.read_text(), text))
        print("updated README.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
