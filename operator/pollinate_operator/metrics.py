"""Prometheus metrics of the operator: reconciles, errors, latency, rounds completed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram

from .api.traininground import TrainingRoundStatus

RECONCILES = Counter("pollinate_reconciles_total", "Reconcile passes", ["kind"])
RECONCILE_ERRORS = Counter("pollinate_reconcile_errors_total", "Reconcile passes that raised", ["kind"])
RECONCILE_SECONDS = Histogram(
    "pollinate_reconcile_seconds", "Time of one reconcile pass", ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
ROUNDS_COMPLETED = Counter("pollinate_rounds_completed_total", "Flower rounds completed", ["namespace"])
RUNS_FINISHED = Counter("pollinate_runs_finished_total", "TrainingRounds that ended", ["phase"])


@contextmanager
def observe_reconcile(kind: str) -> Iterator[None]:
    start = time.perf_counter()
    RECONCILES.labels(kind).inc()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(kind).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - start)


def count_training_round(namespace: str, before: TrainingRoundStatus, after: TrainingRoundStatus,
                         terminal: tuple[str, ...] = ("Succeeded", "Failed")) -> None:
    """Count what one TrainingRound pass saw happen: rounds completed since the last status,
    and the run's end (once, when it first reaches a terminal phase)."""
    done = (after.round or 0) - (before.round or 0)
    if done > 0:
        ROUNDS_COMPLETED.labels(namespace).inc(done)
    if after.phase in terminal and before.phase not in terminal:
        RUNS_FINISHED.labels(after.phase).inc()
