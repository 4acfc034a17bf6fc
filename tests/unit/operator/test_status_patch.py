"""Status is written as a JSON merge patch: what a pass unsets must disappear from the stored
status, or the next pass reads it back (a suspended round's old runId made its resume fail)."""

from __future__ import annotations

import datetime as dt

from pollinate_operator.api import TrainingRoundStatus
from pollinate_operator.reconcile.traininground import RunObserved, TrainingRoundObserved, decide


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386, as the API server applies kopf's status patch."""
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_patch(result[key], value)
        else:
            result[key] = value
    return result


def test_a_field_that_became_unset_is_deleted_and_kopfs_keys_are_kept() -> None:
    stored = {"phase": "Running", "runId": "7", "round": 2, "kopf": {"progress": {}}}
    patch = TrainingRoundStatus(phase="Suspended", round=2).merge_patch_over(stored)
    assert patch["runId"] is None
    assert "kopf" not in patch
    assert merge_patch(stored, patch) == {"phase": "Suspended", "round": 2, "kopf": {"progress": {}},
                                         "sites": [], "metrics": [], "conditions": []}


def test_a_status_that_says_what_is_stored_patches_nothing() -> None:
    status = TrainingRoundStatus(phase="Running", round=2, run_id="7")
    assert status.merge_patch_over(status.to_wire()) == {}
    stored = {**status.to_wire(), "kopf": {"progress": {}}}
    assert TrainingRoundStatus(phase="Running", round=3, run_id="7").merge_patch_over(stored) == {"round": 3}


def test_nothing_is_deleted_that_was_not_stored() -> None:
    patch = TrainingRoundStatus(phase="Running").merge_patch_over(None)
    assert None not in patch.values()


def test_a_suspended_round_resumes_with_a_new_run_once_its_status_is_stored(fed_spec, tr_spec) -> None:
    now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)

    def observe(previous: TrainingRoundStatus, run: RunObserved | None) -> TrainingRoundObserved:
        return TrainingRoundObserved(
            now=now, generation=2, federation=fed_spec, federation_ready=True, jobs={}, run=run,
            server_reachable=True, progress=None, previous=previous,
            registered_nodes={s.name: i for i, s in enumerate(fed_spec.sites)})

    stored = TrainingRoundStatus(phase="Running", run_id="7", round=1, run_submissions=1).to_wire()
    suspend = tr_spec.model_copy(update={"suspend": True})
    suspended = decide("notes-v1", suspend, observe(TrainingRoundStatus.from_stored(stored),
                                                    RunObserved("running")))
    stored = merge_patch(stored, suspended.status.merge_patch_over(stored))
    assert "runId" not in stored
    # The handler looks a run up by the stored runId: none now, and the stopped run is finished.
    resumed = decide("notes-v1", tr_spec, observe(TrainingRoundStatus.from_stored(stored), None))
    assert resumed.status.phase == "Running" and resumed.submit_run


def test_a_rounds_refusals_reach_the_status_as_the_server_wrote_them() -> None:
    from pollinate_operator.api import RoundMetrics

    stored = {"round": 1, "participants": 3,
              "rejected": [{"site": "mallory", "reason": "NonFiniteValues: ..."}],
              "evalRejected": [{"site": "mallory", "reason": "InvalidMetric: eval-loss is nan, ..."}],
              "cappedExamples": {"eve": "1e+09"}}
    assert RoundMetrics.from_stored(stored).to_wire() == stored
