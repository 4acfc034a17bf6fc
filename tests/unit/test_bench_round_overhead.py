"""The round-overhead benchmark's arithmetic, on a made-up run: round wall times from the
server's log, the slowest site's compute, the fixed cost between them and its verdicts. The
benchmark itself needs the S3 server, a SuperLink and three sites (minutes), so it is not run
here; `python bench/round_overhead.py --tiny` is its smallest run."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import round_overhead as ro

T0 = datetime(2026, 11, 22, 6, 0, 0).timestamp()


def log_line(seconds: float, text: str, level: str = "INFO") -> str:
    stamp = datetime.fromtimestamp(T0 + seconds).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    return f"{stamp} {level} pollinate_runtime.rounds: {text}"


SERVER_LOG = "\n".join([
    log_line(1.0, "round 1: site site-c is offline; waiting for it to come back"),
    log_line(10.0, "round 1/3: 3 sites, train loss 2.5, 9.0 s"),
    log_line(12.5, "round 2: rejected the update of site site-b: ...", level="WARNING"),
    log_line(14.5, "round 2/3: 3 sites, train loss 2.4, 4.2 s"),
    log_line(19.25, "round 3/3: 3 sites, train loss 2.3, 4.5 s"),
    "2026-11-22 06:00:20,000 INFO flwr: something else",
])


def message(site: str, round_: int, start: float, seconds: float, kind: str = "train") -> dict:
    return {"mode": "resident", "site": site, "kind": kind, "round": round_,
            "start": T0 + start, "end": T0 + start + seconds, "compute_seconds": seconds,
            "metrics": {"train-seconds": seconds / 2, "eval-seconds": 0.1, "train-loss": 2.0}}


MESSAGES = [
    message("site-a", 0, 0.5, 0.2, kind="init"),
    *(message(s, 1, 2.0, 7.0) for s in ("site-a", "site-b", "site-c")),
    message("site-a", 2, 11.0, 2.0), message("site-b", 2, 11.5, 2.5), message("site-c", 2, 12.0, 1.5),
    message("site-a", 3, 16.0, 2.0), message("site-b", 3, 16.0, 2.25), message("site-c", 3, 16.5, 1.0),
    message("site-a", 3, 19.5, 0.3, kind="evaluate"),
]
PROGRESS = [{"round": 0, "perplexity": 9.0}, {"round": 1, "seconds": 9.0},
            {"round": 2, "seconds": 4.2}, {"round": 3, "seconds": 4.5}]


def test_round_ends_are_read_from_the_servers_round_lines_only():
    ends = ro.rounds_finished(SERVER_LOG)
    assert sorted(ends) == [1, 2, 3]
    assert ends[2] - ends[1] == pytest.approx(4.5)
    assert ends[3] - ends[2] == pytest.approx(4.75)


def test_fixed_cost_is_the_rounds_wall_time_minus_its_slowest_sites_compute():
    result = ro.analyse(PROGRESS, ro.rounds_finished(SERVER_LOG), MESSAGES)
    rows = {r["round"]: r for r in result["rounds"]}
    assert sorted(rows) == [1, 2, 3]
    assert "fixed_seconds" not in rows[1]  # nothing before it to time it from
    assert rows[2]["slowest_site"] == "site-b" and rows[2]["slowest_compute_seconds"] == 2.5
    assert rows[2]["wall_seconds"] == pytest.approx(4.5)
    assert rows[2]["fixed_seconds"] == pytest.approx(2.0)
    # 10.0 -> first compute at 11.0; last compute ends 14.0 -> round logged at 14.5.
    assert rows[2]["to_first_compute_seconds"] == pytest.approx(1.0)
    assert rows[2]["from_last_compute_seconds"] == pytest.approx(0.5)
    assert rows[2]["sites_not_overlapping_seconds"] == pytest.approx(0.5)
    assert rows[3]["fixed_seconds"] == pytest.approx(2.5)
    assert rows[2]["site_reported"]["site-a"] == {"train-seconds": 1.0, "eval-seconds": 0.1}
    summary = result["summary"]
    assert summary["rounds_timed"] == 2
    assert summary["fixed_median_seconds"] == pytest.approx(2.25)
    assert summary["share_of_60s_round"] == pytest.approx(2.25 / 62.25, abs=1e-4)


def test_headlines_judge_both_targets_and_compare_a_fresh_process_per_round():
    resident = {"model": "tiny", "model_label": "tiny", "mode": "resident",
                **ro.analyse(PROGRESS, ro.rounds_finished(SERVER_LOG), MESSAGES)}
    stock = {"model": "tiny", "model_label": "tiny", "mode": "stock", "rounds": [],
             "summary": {**resident["summary"], "fixed_median_seconds": 9.0, "wall_median_seconds": 11.0}}
    cold = {"model": "tiny", "model_label": "tiny", "mode": "resident-cold", "rounds": [],
            "summary": {**resident["summary"], "fixed_median_seconds": 3.375,
                        "share_of_60s_round": 0.0532}}
    heads = ro.headlines([resident, cold, stock])
    assert [h.met for h in heads] == [False, True, False, None]  # 2.25 s > 2 s; 3.6% < 5%; 3.4 s > 2 s
    assert heads[1].ratio == "3.6%"
    assert heads[2].ratio == "1.50x" and "5.3%" in heads[2].measured
    assert heads[3].ratio == "4.0x"
    notes = ro.notes([resident, cold, stock], heads)
    assert any(n.startswith("missed: ") and "new Python interpreter" in n for n in notes)
    assert any(n.startswith("missed: ") and "3 s after an empty pull" in n for n in notes)
    assert any("2.25 s = " in n for n in notes)
