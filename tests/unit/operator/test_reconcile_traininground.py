"""The TrainingRound state machine as a table of observations and decisions."""

from __future__ import annotations

import datetime as dt

import pytest
from pollinate_operator.api import FederationSpec, TrainingRoundSpec, TrainingRoundStatus
from pollinate_operator.api.traininground import RoundMetrics
from pollinate_operator.reconcile.traininground import (
    Decision,
    JobObserved,
    PodObserved,
    Progress,
    RunObserved,
    TrainingRoundObserved,
    decide,
)

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
SITES = ("hospital-a", "hospital-b", "clinic-c")


def running_jobs(*sites: str, phase: str = "Running") -> dict[str, JobObserved]:
    return {s: JobObserved(name=f"notes-v1-{s}", active=1, pods=(PodObserved(phase, node=f"gpu-{s}-0"),))
            for s in sites}


def observe(fed: FederationSpec | None, **overrides) -> TrainingRoundObserved:
    values = dict(now=NOW, generation=1, federation=fed, federation_ready=True, jobs={},
                  run=None, server_reachable=True, progress=None, previous=TrainingRoundStatus(),
                  registered_nodes={s: i for i, s in enumerate(SITES)})
    values.update(overrides)
    return TrainingRoundObserved(**values)


def reasons(decision: Decision) -> list[str]:
    return [e.reason for e in decision.events]


def test_missing_federation_keeps_the_round_pending_with_a_condition(tr_spec: TrainingRoundSpec) -> None:
    d = decide("notes-v1", tr_spec, observe(None))
    assert d.status.phase == "Pending"
    cond = next(c for c in d.status.conditions if c.type == "FederationFound")
    assert cond.status == "False" and cond.reason == "FederationNotFound"
    assert "spec.federation 'clinical-notes'" in cond.message
    assert not d.submit_run and not d.create_jobs
    assert reasons(d) == ["FederationNotFound"]


def test_a_run_waits_until_the_server_has_registered_every_sites_key(fed_spec, tr_spec) -> None:
    # A restarted server forgets the keys until the Federation registers them again: a run
    # submitted before would name nodes the server does not have.
    d = decide("notes-v1", tr_spec, observe(fed_spec, registered_nodes={"hospital-a": 1}))
    assert not d.submit_run
    cond = next(c for c in d.status.conditions if c.type == "SitesPending")
    assert cond.reason == "KeysNotRegistered" and "hospital-b, clinic-c" in cond.message
    assert "RunSubmitted" not in reasons(d)


def test_site_not_in_federation_fails_naming_the_field(fed_spec, tr_spec) -> None:
    spec = tr_spec.model_copy(update={"sites": ["hospital-a", "mars-base"]})
    d = decide("notes-v1", spec, observe(fed_spec))
    assert d.status.phase == "Failed"
    failed = next(c for c in d.status.conditions if c.type == "Failed")
    assert failed.reason == "InvalidSpec"
    assert "spec.sites: 'mars-base' not a site of Federation 'clinical-notes'" in failed.message


def test_min_sites_above_federation_sites_fails(fed_spec, tr_spec) -> None:
    spec = tr_spec.model_copy(update={"sites": None, "min_sites": 9})
    d = decide("notes-v1", spec, observe(fed_spec))
    assert d.status.phase == "Failed"
    assert "spec.minSites 9 is more than the 4 sites" in d.status.conditions[-1].message


def test_federation_not_ready_waits(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(fed_spec, federation_ready=False))
    assert d.status.phase == "Pending"
    assert not d.submit_run and not d.create_jobs


def test_ready_federation_submits_the_run_and_creates_one_job_per_site(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(fed_spec))
    assert d.status.phase == "Running"
    assert d.submit_run
    assert d.create_jobs == SITES
    assert d.status.progress == "0/3"
    assert d.status.sites_ready == "0/3"
    assert d.status.start_time == "2026-11-22T12:00:00Z"
    assert "RunSubmitted" in reasons(d)


def test_existing_jobs_and_run_are_not_duplicated(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7", start_time="t")
    d = decide("notes-v1", tr_spec, observe(
        fed_spec, jobs=running_jobs(*SITES), run=RunObserved("running"), previous=prev))
    assert not d.submit_run and d.create_jobs == ()
    assert d.status.sites_ready == "3/3"
    assert [s.node for s in d.status.sites] == [f"gpu-{s}-0" for s in SITES]


def test_external_sites_get_no_job(fed_spec, tr_spec) -> None:
    spec = tr_spec.model_copy(update={"sites": ["hospital-a", "alice-laptop"]})
    d = decide("notes-v1", spec, observe(fed_spec))
    assert d.create_jobs == ("hospital-a",)
    assert {s.name: s.state for s in d.status.sites}["alice-laptop"] == "External"


def test_unschedulable_site_is_reported_after_pending_timeout_and_the_round_goes_on(fed_spec, tr_spec):
    jobs = running_jobs("hospital-a", "hospital-b")
    since = NOW - dt.timedelta(seconds=tr_spec.pending_timeout_seconds + 1)
    full = "0/7 nodes are available: 2 Insufficient nvidia.com/gpu"
    jobs["clinic-c"] = JobObserved("notes-v1-clinic-c", active=1, pods=(PodObserved(
        "Pending", unschedulable_since=since, message=full),))
    prev = TrainingRoundStatus(phase="Running", run_id="7")
    d = decide("notes-v1", tr_spec, observe(fed_spec, jobs=jobs, run=RunObserved("running"), previous=prev))
    assert d.status.phase == "Running"
    state = {s.name: s for s in d.status.sites}["clinic-c"]
    assert state.state == "Unschedulable" and "Insufficient nvidia.com/gpu" in state.message
    cond = next(c for c in d.status.conditions if c.type == "SitesPending")
    assert cond.status == "True" and "clinic-c" in cond.message
    assert reasons(d) == ["SiteUnschedulable"]


def test_unschedulable_site_before_the_timeout_is_just_pending(fed_spec, tr_spec) -> None:
    jobs = {"clinic-c": JobObserved("j", active=1, pods=(PodObserved(
        "Pending", unschedulable_since=NOW - dt.timedelta(seconds=5), message="no gpu"),))}
    d = decide("notes-v1", tr_spec, observe(fed_spec, jobs=jobs))
    assert {s.name: s.state for s in d.status.sites}["clinic-c"] == "Pending"


def test_too_few_sites_left_fails_the_round(fed_spec, tr_spec) -> None:
    since = NOW - dt.timedelta(hours=1)
    jobs = {s: JobObserved(f"j-{s}", active=1, pods=(PodObserved("Pending", unschedulable_since=since),))
            for s in ("hospital-b", "clinic-c")}
    jobs.update(running_jobs("hospital-a"))
    prev = TrainingRoundStatus(phase="Running", run_id="7")
    d = decide("notes-v1", tr_spec, observe(fed_spec, jobs=jobs, run=RunObserved("running"), previous=prev))
    assert d.status.phase == "Failed"
    assert d.stop_run
    assert set(d.delete_jobs) == set(SITES)
    assert "only 1 of 3 sites can take part, minSites is 2" in d.status.conditions[-1].message


def test_progress_from_the_server_reaches_status(fed_spec, tr_spec) -> None:
    metrics = (RoundMetrics(round=1, perplexity=40.0), RoundMetrics(round=2, perplexity=31.5))
    prev = TrainingRoundStatus(phase="Running", run_id="7", round=1)
    d = decide("notes-v1", tr_spec, observe(
        fed_spec, jobs=running_jobs(*SITES), run=RunObserved("running"), previous=prev,
        progress=Progress(2, metrics, None, "checkpoints/notes-v1/round-2/manifest.json")))
    assert d.status.round == 2 and d.status.progress == "2/3"
    assert d.status.last_perplexity == 31.5
    assert d.status.last_checkpoint.endswith("round-2/manifest.json")
    assert "RoundCompleted" in reasons(d)


def test_completed_run_succeeds_with_the_adapter_version_and_frees_the_gpus(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7", round=2)
    d = decide("notes-v1", tr_spec, observe(
        fed_spec, jobs=running_jobs(*SITES), run=RunObserved("finished", "completed"), previous=prev,
        progress=Progress(3, (RoundMetrics(round=3, perplexity=20.0),), "v4", "k")))
    assert d.status.phase == "Succeeded"
    assert d.status.adapter_version == "v4"
    assert d.status.completion_time == "2026-11-22T12:00:00Z"
    assert set(d.delete_jobs) == set(SITES)
    assert "published adapter v4" in d.status.conditions[-1].message


def test_failed_run_fails_with_flowers_details(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7")
    d = decide("notes-v1", tr_spec, observe(
        fed_spec, run=RunObserved("finished", "failed", "ServerApp raised"), previous=prev))
    assert d.status.phase == "Failed"
    assert d.status.conditions[-1].reason == "RunFailed"
    assert "ServerApp raised" in d.status.conditions[-1].message


def test_vanished_run_is_resubmitted_to_resume_from_the_checkpoint(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7", round=1)
    d = decide("notes-v1", tr_spec, observe(fed_spec, jobs=running_jobs(*SITES), run=None, previous=prev))
    assert d.submit_run
    assert "RunResubmitted" in reasons(d)


def test_unreachable_server_submits_nothing(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(fed_spec, server_reachable=False))
    assert not d.submit_run
    assert d.create_jobs == SITES  # the clients can start and wait for the server


def test_suspend_stops_the_run_and_jobs_then_resume_resubmits(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7")
    spec = tr_spec.model_copy(update={"suspend": True})
    d = decide("notes-v1", spec, observe(
        fed_spec, jobs=running_jobs(*SITES), run=RunObserved("running"), previous=prev))
    assert d.status.phase == "Suspended" and d.stop_run and set(d.delete_jobs) == set(SITES)
    assert d.status.run_id is None
    resumed = decide("notes-v1", tr_spec, observe(fed_spec, run=None, previous=d.status))
    assert resumed.status.phase == "Running" and resumed.submit_run
    assert "Resumed" in reasons(resumed)


def test_terminal_round_only_cleans_up(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Succeeded", run_id="7")
    d = decide("notes-v1", tr_spec, observe(fed_spec, jobs=running_jobs("hospital-a"), previous=prev))
    assert d.status.phase == "Succeeded"
    assert d.delete_jobs == ("hospital-a",) and not d.submit_run and not d.events


def test_a_running_round_keeps_reporting_while_its_federation_is_degraded(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7", round=0)
    d = decide("notes-v1", tr_spec, observe(
        fed_spec, federation_ready=False, jobs=running_jobs(*SITES), run=RunObserved("running"),
        previous=prev, progress=Progress(1, (RoundMetrics(round=1, perplexity=30.0),))))
    assert d.status.phase == "Running" and d.status.round == 1
    cond = next(c for c in d.status.conditions if c.type == "FederationReady")
    assert cond.status == "False"


def test_first_submission_counts_one_run_and_resumes_from_nothing(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(fed_spec))
    assert d.submit_run
    assert d.status.run_submissions == 1 and d.status.resumed_from_round is None


def test_a_run_the_server_lost_is_resubmitted_and_status_records_it(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7", round=1, run_submissions=1)
    d = decide("notes-v1", tr_spec, observe(
        fed_spec, jobs=running_jobs(*SITES), run=None, previous=prev,
        progress=Progress(2, (RoundMetrics(round=2),), None, "k")))
    assert d.submit_run
    assert d.status.run_submissions == 2
    assert d.status.resumed_from_round == 2
    event = next(e for e in d.events if e.reason == "RunResubmitted")
    assert "after round 2" in event.message


def test_a_status_from_before_the_count_still_counts_its_first_run(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7", round=1)
    d = decide("notes-v1", tr_spec, observe(fed_spec, jobs=running_jobs(*SITES), previous=prev))
    assert d.status.run_submissions == 2 and d.status.resumed_from_round == 1


def test_resume_after_suspend_is_a_resubmission_from_the_last_round(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7", round=2, run_submissions=1)
    suspended = decide("notes-v1", tr_spec.model_copy(update={"suspend": True}), observe(
        fed_spec, jobs=running_jobs(*SITES), run=RunObserved("running"), previous=prev))
    assert suspended.status.run_submissions == 1
    resumed = decide("notes-v1", tr_spec, observe(
        fed_spec, previous=suspended.status, progress=Progress(2, (), None, "k")))
    assert resumed.submit_run
    assert resumed.status.run_submissions == 2 and resumed.status.resumed_from_round == 2
    assert resumed.status.round == 2 and resumed.status.progress == "2/3"
    assert "resuming after round 2" in next(e for e in resumed.events if e.reason == "RunSubmitted").message


def test_no_submission_leaves_the_count_alone(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7", run_submissions=3, resumed_from_round=1)
    d = decide("notes-v1", tr_spec, observe(
        fed_spec, jobs=running_jobs(*SITES), run=RunObserved("running"), previous=prev))
    assert not d.submit_run
    assert d.status.run_submissions == 3 and d.status.resumed_from_round == 1


def test_waiting_for_the_federation_posts_an_event_once(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(fed_spec, federation_ready=False))
    assert reasons(d) == ["FederationNotReady"]
    assert "Federation 'clinical-notes' is not Ready" in d.events[0].message
    again = decide("notes-v1", tr_spec, observe(fed_spec, federation_ready=False, previous=d.status))
    assert again.status.phase == "Pending" and reasons(again) == []


def test_waiting_for_site_keys_posts_an_event_once(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(fed_spec, registered_nodes={"hospital-a": 1}))
    assert "KeysNotRegistered" in reasons(d)
    again = decide("notes-v1", tr_spec, observe(fed_spec, registered_nodes={"hospital-a": 1},
                                                 previous=d.status))
    assert "KeysNotRegistered" not in reasons(again)


def test_a_site_whose_job_gives_up_is_failed_and_reported(fed_spec, tr_spec) -> None:
    jobs = running_jobs("hospital-a", "hospital-b")
    jobs["clinic-c"] = JobObserved("notes-v1-clinic-c", failed=True,
                                   pods=(PodObserved("Failed", "gpu-clinic-c-0"),))
    prev = TrainingRoundStatus(phase="Running", run_id="7")
    d = decide("notes-v1", tr_spec, observe(fed_spec, jobs=jobs, run=RunObserved("running"), previous=prev))
    state = {s.name: s for s in d.status.sites}["clinic-c"]
    assert state.state == "Failed" and "backoffLimit" in state.message
    assert "SiteFailed" in reasons(d)
    assert d.status.phase == "Running"  # minSites 2 still holds
    cond = next(c for c in d.status.conditions if c.type == "SitesPending")
    assert cond.reason == "SitesLeftOut" and "clinic-c" in cond.message
    again = decide("notes-v1", tr_spec, observe(fed_spec, jobs=jobs, run=RunObserved("running"),
                                                 previous=d.status))
    assert "SiteFailed" not in reasons(again)


def test_a_stopped_run_fails_the_round_as_stopped(fed_spec, tr_spec) -> None:
    prev = TrainingRoundStatus(phase="Running", run_id="7")
    d = decide("notes-v1", tr_spec, observe(
        fed_spec, jobs=running_jobs(*SITES), run=RunObserved("finished", "stopped"), previous=prev))
    assert d.status.phase == "Failed"
    failed = next(c for c in d.status.conditions if c.type == "Failed")
    assert failed.reason == "RunStopped" and failed.message == "Flower run 7 stopped"
    assert set(d.delete_jobs) == set(SITES) and not d.stop_run
    assert reasons(d) == ["RunStopped"]


def test_status_records_the_generation_it_describes(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(fed_spec, generation=4))
    assert d.status.observed_generation == 4
    assert all(c.observed_generation == 4 for c in d.status.conditions)


def test_status_names_the_runs_folder_in_s3_and_keeps_it(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(fed_spec, run_key="notes-v1-5e6f7a8b"))
    assert d.status.run_key == "notes-v1-5e6f7a8b"
    assert d.status.to_wire()["runKey"] == "notes-v1-5e6f7a8b"
    later = decide("notes-v1", tr_spec, observe(fed_spec, previous=d.status))
    assert later.status.run_key == "notes-v1-5e6f7a8b"


@pytest.mark.parametrize("phase", ["Running", "Suspended"])
def test_a_federation_deleted_under_a_run_fails_it_naming_the_federation_and_frees_the_gpus(
        fed_spec, tr_spec, phase) -> None:
    running = decide("notes-v1", tr_spec, observe(fed_spec, jobs=running_jobs(*SITES)))
    previous = running.status.model_copy(update={"phase": phase, "run_id": "7"})
    d = decide("notes-v1", tr_spec, observe(None, jobs=running_jobs(*SITES), previous=previous))
    assert d.status.phase == "Failed"
    failed = next(c for c in d.status.conditions if c.type == "Failed")
    assert failed.reason == "FederationDeleted" and "'clinical-notes' was deleted" in failed.message
    assert set(d.delete_jobs) == set(SITES) and not d.stop_run
    assert [e.reason for e in d.events] == ["FederationDeleted"]


def test_a_round_waiting_for_a_federation_not_yet_created_stays_pending(fed_spec, tr_spec) -> None:
    d = decide("notes-v1", tr_spec, observe(None))
    assert d.status.phase == "Pending" and not d.delete_jobs
