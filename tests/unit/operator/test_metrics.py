"""The operator's Prometheus metrics move when reconciles run, fail and rounds complete."""

from __future__ import annotations

import pytest
from pollinate_operator.api import TrainingRoundStatus
from pollinate_operator.metrics import count_training_round, observe_reconcile
from prometheus_client import REGISTRY


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_reconcile_pass_is_counted_and_timed() -> None:
    passes, timed = sample("pollinate_reconciles_total", kind="unit-ok"), \
        sample("pollinate_reconcile_seconds_count", kind="unit-ok")
    with observe_reconcile("unit-ok"):
        pass
    assert sample("pollinate_reconciles_total", kind="unit-ok") == passes + 1
    assert sample("pollinate_reconcile_seconds_count", kind="unit-ok") == timed + 1
    assert sample("pollinate_reconcile_seconds_sum", kind="unit-ok") > 0
    assert sample("pollinate_reconcile_errors_total", kind="unit-ok") == 0


def test_a_pass_that_raises_is_an_error_and_still_timed() -> None:
    with pytest.raises(RuntimeError), observe_reconcile("unit-fail"):
        raise RuntimeError("API server gone")
    assert sample("pollinate_reconcile_errors_total", kind="unit-fail") == 1
    assert sample("pollinate_reconciles_total", kind="unit-fail") == 1
    assert sample("pollinate_reconcile_seconds_count", kind="unit-fail") == 1
    # Under the first bucket (10 ms): a pass that raised at once.
    assert sample("pollinate_reconcile_seconds_bucket", kind="unit-fail", le="0.01") == 1


def test_rounds_completed_count_what_each_pass_saw_finish() -> None:
    ns = "unit-rounds"
    count_training_round(ns, TrainingRoundStatus(), TrainingRoundStatus(phase="Running", round=0))
    assert sample("pollinate_rounds_completed_total", namespace=ns) == 0
    count_training_round(ns, TrainingRoundStatus(phase="Running", round=0),
                         TrainingRoundStatus(phase="Running", round=2))
    count_training_round(ns, TrainingRoundStatus(phase="Running", round=2),
                         TrainingRoundStatus(phase="Running", round=2))
    assert sample("pollinate_rounds_completed_total", namespace=ns) == 2
    count_training_round(ns, TrainingRoundStatus(phase="Running", round=2),
                         TrainingRoundStatus(phase="Running", round=3))
    assert sample("pollinate_rounds_completed_total", namespace=ns) == 3


def test_a_run_that_ends_is_counted_once_by_its_phase() -> None:
    before = sample("pollinate_runs_finished_total", phase="Succeeded")
    running = TrainingRoundStatus(phase="Running", round=3)
    done = TrainingRoundStatus(phase="Succeeded", round=3)
    count_training_round("unit-runs", running, done)
    count_training_round("unit-runs", done, done)  # later passes over the finished round
    assert sample("pollinate_runs_finished_total", phase="Succeeded") == before + 1
