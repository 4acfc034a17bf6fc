"""The demo's report: markdown plus PNG plots of one TrainingRound, from its status and the
progress the server wrote to S3 (which keeps the per-site detail the status leaves out)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def _series(rounds: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for entry in rounds:
        value = entry.get(key)
        if value is not None and math.isfinite(value):
            xs.append(entry["round"])
            ys.append(value)
    return xs, ys


def _site_series(rounds: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for entry in rounds:
        for site, value in (entry.get(key) or {}).items():
            if value is not None and math.isfinite(value):
                xs, ys = out.setdefault(site, ([], []))
                xs.append(entry["round"])
                ys.append(value)
    return out


def _plot(path: Path, title: str, ylabel: str, lines: dict[str, tuple[list[int], list[float]]],
          log: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (xs, ys) in lines.items():
        if xs:
            ax.plot(xs, ys, marker="o", label=label, linewidth=2 if label.startswith("federated") else 1)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(folder: Path, name: str, status: dict[str, Any], rounds: list[dict[str, Any]],
                 extra: dict[str, Any] | None = None) -> Path:
    """Write report.md and the plots into `folder`; return the markdown file."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    _plot(folder / "loss.png", "Training loss per round", "loss",
          {"federated (example-weighted)": _series(rounds, "trainLoss"),
           **{f"site {s}": v for s, v in _site_series(rounds, "siteTrainLoss").items()}})
    _plot(folder / "perplexity.png", "Eval perplexity of the global adapter", "perplexity",
          {"federated (example-weighted)": _series(rounds, "perplexity"),
           **{f"site {s}": v for s, v in _site_series(rounds, "sitePerplexity").items()},
           "general held-out text": _series(rounds, "generalPerplexity")})
    sent = _series(rounds, "bytesSent")
    received = _series(rounds, "bytesReceived")
    _plot(folder / "bytes.png", "Bytes moved per round (all sites)", "bytes",
          {"server -> sites": sent, "sites -> server": received})

    first = next((r for r in rounds if r.get("perplexity") is not None), {})
    last = next((r for r in reversed(rounds) if r.get("perplexity") is not None), {})
    total_bytes = sum(sent[1]) + sum(received[1])
    lines = [
        f"# Pollinate demo report: {name}",
        "",
        f"- phase: **{status.get('phase')}**, rounds {status.get('progress')}, "
        f"adapter version **{status.get('adapterVersion', '-')}**",
        f"- federated perplexity: {_fmt(first.get('perplexity'))} before training -> "
        f"{_fmt(last.get('perplexity'))} after round {last.get('round', '-')}",
        f"- bytes moved in all: {total_bytes:,} ({total_bytes / 2**20:.2f} MiB); only LoRA "
        "adapters travel, never data",
    ]
    if failed := next((c for c in status.get("conditions", [])
                       if c.get("type") == "Failed" and c.get("status") == "True"), None):
        lines.append(f"- why it failed: {failed.get('reason')}: {failed.get('message')}")
    for key, value in extra.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "| round | sites | train loss | eval loss | perplexity | general ppl | bytes sent "
        "| bytes received | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rounds:
        lines.append(
            f"| {r['round']} | {_fmt(r.get('participants'))} | {_fmt(r.get('trainLoss'), 4)} | "
            f"{_fmt(r.get('evalLoss'), 4)} | {_fmt(r.get('perplexity'))} | "
            f"{_fmt(r.get('generalPerplexity'))} | {_fmt(r.get('bytesSent'))} | "
            f"{_fmt(r.get('bytesReceived'))} | {_fmt(r.get('seconds'), 1)} |")
    lines += ["", "Round 0 is the starting adapter (the base model), evaluated by every site.", "",
              "![loss](loss.png)", "", "![perplexity](perplexity.png)", "", "![bytes](bytes.png)", ""]
    sites = status.get("sites") or []
    if sites:
        lines += ["| site | state | node | message |", "| --- | --- | --- | --- |"]
        lines += [f"| {s.get('name')} | {s.get('state')} | {s.get('node', '-')} | {s.get('message', '')} |"
                  for s in sites]
    report = folder / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (folder / "status.json").write_text(json.dumps({"status": status, "rounds": rounds}, indent=2))
    return report
