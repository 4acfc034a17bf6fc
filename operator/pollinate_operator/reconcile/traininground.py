"""The TrainingRound state machine: one pure function from what is observed to what to do.

Like KubeRay's RayJob controller, a single `decide` looks at the Federation, the client
Jobs and their pods, the Flower run and the progress the server wrote to S3, and returns
the actions and the status. It is called on every pass (create, update, and a timer), so
the status always describes what is, not what happened to be seen once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..api.conditions import Condition, set_condition
from ..api.federation import FederationSpec
from ..api.traininground import (
    Phase,
    RoundMetrics,
    SiteStatus,
    TrainingRoundSpec,
    TrainingRoundStatus,
)
from ..manifests import names
from ..manifests.run import participating_sites

TERMINAL: tuple[Phase, ...] = ("Succeeded", "Failed")


def settled(status: Mapping[str, Any]) -> bool:
    """Finished, or suspended until its spec changes: only the settled resync looks at it."""
    return status.get("phase") in (*TERMINAL, "Suspended")


@dataclass(frozen=True)
class PodObserved:
    phase: str
    node: str | None = None
    # When the scheduler last said it cannot place the pod (PodScheduled=False, Unschedulable).
    unschedulable_since: dt.datetime | None = None
    message: str = ""


@dataclass(frozen=True)
class JobObserved:
    name: str
    active: int = 0
    succeeded: int = 0
    failed: bool = False  # the Job itself gave up (backoffLimit)
    pods: tuple[PodObserved, ...] = ()


@dataclass(frozen=True)
class RunObserved:
    status: str  # pending | starting | running | finished
    sub_status: str = ""
    details: str = ""


@dataclass(frozen=True)
class Progress:
    """What the server app wrote to S3 after its last round."""

    round: int
    metrics: tuple[RoundMetrics, ...] = ()
    adapter_version: str | None = None
    last_checkpoint: str | None = None


@dataclass(frozen=True)
class TrainingRoundObserved:
    now: dt.datetime
    generation: int
    federation: FederationSpec | None
    federation_ready: bool
    jobs: dict[str, JobObserved]
    # None: no run known. Only meaningful when server_reachable.
    run: RunObserved | None
    server_reachable: bool
    progress: Progress | None
    previous: TrainingRoundStatus = field(default_factory=TrainingRoundStatus)
    # Site name -> node id of the keys the Flower server has registered now (with node
    # authentication; empty without). A restarted server forgets them until the Federation
    # registers them again, and a run must not be submitted naming nodes it does not have.
    registered_nodes: dict[str, int] = field(default_factory=dict)
    # The run's folder name in S3 (run_config.run_key: the name and the uid's start).
    run_key: str | None = None


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: TrainingRoundStatus
    submit_run: bool = False
    stop_run: bool = False
    create_jobs: tuple[str, ...] = ()
    delete_jobs: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_against_federation(name: str, spec: TrainingRoundSpec, fed_name: str,
                                fed: FederationSpec) -> str | None:
    """Rules the API server cannot check because they span two resources."""
    known = [s.name for s in fed.sites]
    unknown = [s for s in (spec.sites or []) if s not in known]
    if unknown:
        return (f"spec.sites: {', '.join(repr(s) for s in unknown)} not a site of Federation "
                f"{fed_name!r} (its sites: {', '.join(known)})")
    taking_part = participating_sites(spec, fed)
    if spec.min_sites > len(taking_part):
        return (f"spec.minSites {spec.min_sites} is more than the {len(taking_part)} sites taking part "
                f"({', '.join(taking_part)})")
    return None


def _already(prev: TrainingRoundStatus, condition: str, reason: str) -> bool:
    """Whether the last pass already recorded this state (its Event was posted then)."""
    return any(c.type == condition and c.reason == reason for c in prev.conditions)


def submissions_after_submit(prev: TrainingRoundStatus, done_rounds: int) -> dict:
    """Status fields once a run is submitted: how many runs this TrainingRound has had, and,
    for any but the first (a server that lost its run, a resume after suspend), the round
    it continues after."""
    # A status written before runSubmissions existed still shows its run through runId.
    before = prev.run_submissions or (1 if prev.run_id else 0)
    update: dict = {"run_submissions": before + 1}
    if before:
        update["resumed_from_round"] = done_rounds
    return update


def site_states(spec: TrainingRoundSpec, fed: FederationSpec, obs: TrainingRoundObserved,
                training_round: str) -> list[SiteStatus]:
    states = []
    pending_limit = dt.timedelta(seconds=spec.pending_timeout_seconds)
    for site_name in participating_sites(spec, fed):
        site = fed.site(site_name)
        assert site is not None
        if site.external:
            states.append(SiteStatus(name=site_name, state="External",
                                     message="joins from outside the cluster with pollinate-client join"))
            continue
        job = obs.jobs.get(site_name)
        job_name = names.client_job(training_round, site_name)
        if job is None:
            states.append(SiteStatus(name=site_name, state="Pending", job=job_name,
                                     message="client Job not created yet"))
            continue
        pod = job.pods[-1] if job.pods else None
        node = pod.node if pod else None
        if job.failed:
            state, message = "Failed", "client Job failed (backoffLimit reached)"
        elif job.succeeded:
            state, message = "Succeeded", "client finished"
        elif pod and pod.phase == "Running":
            state, message = "Running", ""
        elif pod and pod.unschedulable_since and obs.now - pod.unschedulable_since >= pending_limit:
            state = "Unschedulable"
            message = (f"not scheduled for {spec.pending_timeout_seconds}s: {pod.message}"
                       if pod.message else f"not scheduled for {spec.pending_timeout_seconds}s")
        else:
            state, message = "Pending", pod.message if pod else "waiting for the client pod"
        states.append(SiteStatus(name=site_name, state=state, job=job_name, node=node, message=message))
    return states


def decide(name: str, spec: TrainingRoundSpec, obs: TrainingRoundObserved) -> Decision:
    prev = obs.previous
    gen = obs.generation
    now = _iso(obs.now)
    conditions: list[Condition] = list(prev.conditions)
    base = prev.model_copy(update={"observed_generation": gen, "rounds": spec.rounds,
                                   "run_key": obs.run_key or prev.run_key})

    def finish(phase: Phase, reason: str, message: str, *, stop: bool, events: list[Event],
               status_update: dict | None = None) -> Decision:
        conds = set_condition(conditions, "Running", False, reason, message, gen, now)
        conds = set_condition(conds, phase, True, reason, message, gen, now)
        status = base.model_copy(update={
            "phase": phase, "conditions": conds, "completion_time": prev.completion_time or now,
            **(status_update or {}),
        })
        if prev.phase != phase:
            events.append(Event("Normal" if phase == "Succeeded" else "Warning", reason, message))
        return Decision(status, stop_run=stop, delete_jobs=tuple(obs.jobs), events=tuple(events))

    if prev.phase in TERMINAL:
        return Decision(base, delete_jobs=tuple(obs.jobs))

    fed = obs.federation
    if fed is None and (prev.run_id or prev.start_time or prev.phase in ("Running", "Suspended")):
        # Its server, keys and storage settings went with it: nothing can bring the run back,
        # and client Jobs left running would reconnect for ever, holding their GPUs.
        return finish("Failed", "FederationDeleted",
                      f"Federation {spec.federation!r} was deleted while this TrainingRound ran; "
                      "its server and site keys are gone (checkpoints and adapters stay in S3)",
                      stop=False, events=[])
    if fed is None:
        message = f"spec.federation {spec.federation!r}: no Federation of that name in this namespace"
        conds = set_condition(conditions, "FederationFound", False, "FederationNotFound", message, gen, now)
        events = (Event("Warning", "FederationNotFound", message),) if prev.phase != "Pending" or not any(
            c.reason == "FederationNotFound" for c in prev.conditions) else ()
        return Decision(base.model_copy(update={"phase": "Pending", "conditions": conds}), events=events)
    conditions = set_condition(conditions, "FederationFound", True, "FederationFound", "", gen, now)

    invalid = validate_against_federation(name, spec, spec.federation, fed)
    if invalid:
        return finish("Failed", "InvalidSpec", invalid, stop=bool(prev.run_id), events=[])

    taking_part = participating_sites(spec, fed)
    in_cluster = [s for s in taking_part if not fed.site(s).external]  # type: ignore[union-attr]
    events: list[Event] = []

    if spec.suspend:
        conds = set_condition(conditions, "Suspended", True, "Suspended",
                              "client Jobs stopped; resumes from the last checkpoint", gen, now)
        conds = set_condition(conds, "Running", False, "Suspended", "", gen, now)
        if prev.phase != "Suspended":
            events.append(Event("Normal", "Suspended", "run stopped and client Jobs deleted"))
        return Decision(
            # The stopped run is finished for good; resuming submits a new one.
            base.model_copy(update={"phase": "Suspended", "conditions": conds, "sites": [], "run_id": None}),
            stop_run=bool(prev.run_id) and obs.run is not None and obs.run.status != "finished",
            delete_jobs=tuple(obs.jobs), events=tuple(events))
    if prev.phase == "Suspended":
        conditions = set_condition(conditions, "Suspended", False, "Resumed", "", gen, now)
        events.append(Event("Normal", "Resumed", "resuming from the last checkpoint"))

    if not obs.federation_ready and not prev.run_id:
        message = f"Federation {spec.federation!r} is not Ready yet"
        if not _already(prev, "Running", "FederationNotReady"):
            events.append(Event("Normal", "FederationNotReady", f"waiting: {message}"))
        conds = set_condition(conditions, "Running", False, "FederationNotReady", message, gen, now)
        return Decision(base.model_copy(update={"phase": "Pending", "conditions": conds}),
                        events=tuple(events))
    # A run under way keeps being observed even if its Federation turns Degraded (a server
    # pod restarting): hiding its progress would not make it any healthier.
    conditions = set_condition(
        conditions, "FederationReady", obs.federation_ready,
        "FederationReady" if obs.federation_ready else "FederationNotReady",
        "" if obs.federation_ready else f"Federation {spec.federation!r} is not Ready", gen, now)

    # From here on the run should be going.
    progress = obs.progress
    status_update: dict = {}
    if progress:
        last = next((e for e in reversed(progress.metrics) if e.perplexity is not None), None)
        status_update = {
            "round": progress.round,
            "metrics": list(progress.metrics),
            "last_perplexity": last.perplexity if last else prev.last_perplexity,
            "adapter_version": progress.adapter_version or prev.adapter_version,
            "last_checkpoint": progress.last_checkpoint or prev.last_checkpoint,
        }
        if (prev.round or 0) < progress.round:
            ppl = f", perplexity {last.perplexity:.2f}" if last and last.perplexity else ""
            events.append(Event("Normal", "RoundCompleted",
                                f"round {progress.round}/{spec.rounds} completed{ppl}"))
    done_rounds = status_update.get("round", prev.round or 0)
    status_update["progress"] = f"{done_rounds}/{spec.rounds}"

    run = obs.run
    if run is not None and run.status == "finished":
        if run.sub_status == "completed":
            return finish("Succeeded", "RunCompleted",
                          f"{spec.rounds} rounds completed"
                          + (f"; published adapter {status_update.get('adapter_version')}"
                             if status_update.get("adapter_version") else ""),
                          stop=False, events=events, status_update=status_update)
        return finish("Failed", "RunFailed" if run.sub_status == "failed" else "RunStopped",
                      f"Flower run {prev.run_id} {run.sub_status}: {run.details}".rstrip(": "),
                      stop=False, events=events, status_update=status_update)

    sites = site_states(spec, fed, obs, name)
    for s in sites:
        before = next((p for p in prev.sites if p.name == s.name), None)
        if s.state == "Unschedulable" and (before is None or before.state != "Unschedulable"):
            events.append(Event("Warning", "SiteUnschedulable", f"site {s.name}: {s.message}"))
        if s.state == "Failed" and (before is None or before.state != "Failed"):
            events.append(Event("Warning", "SiteFailed", f"site {s.name}: {s.message}"))
    lost = [s.name for s in sites if s.state in ("Unschedulable", "Failed")]
    available = len(taking_part) - len(lost)
    if available < spec.min_sites:
        return finish("Failed", "InsufficientSites",
                      f"only {available} of {len(taking_part)} sites can take part, minSites is "
                      f"{spec.min_sites} (lost: {', '.join(lost)})",
                      stop=bool(prev.run_id), events=events,
                      status_update={**status_update, "sites": sites})
    if lost:
        conditions = set_condition(
            conditions, "SitesPending", True, "SitesLeftOut",
            f"continuing without {', '.join(lost)}: "
            + "; ".join(s.message for s in sites if s.name in lost), gen, now)
    else:
        conditions = set_condition(conditions, "SitesPending", False, "AllSitesAvailable", "", gen, now)

    submit = obs.server_reachable and (run is None)
    unregistered = ([s for s in taking_part if s not in obs.registered_nodes]
                    if fed.server.node_authentication else [])
    if submit and unregistered:
        submit = False  # the next pass, once the Federation has registered them again
        message = f"waiting for the server to register the keys of {', '.join(unregistered)}"
        if not _already(prev, "SitesPending", "KeysNotRegistered"):
            events.append(Event("Normal", "KeysNotRegistered", message))
        conditions = set_condition(conditions, "SitesPending", True, "KeysNotRegistered", message,
                                   gen, now)
    if submit:
        status_update.update(submissions_after_submit(prev, done_rounds))
    if submit and prev.run_id:
        events.append(Event("Warning", "RunResubmitted",
                            f"Flower run {prev.run_id} is gone (server restarted?); "
                            f"resubmitting, it resumes after round {done_rounds}"))
    elif submit:
        events.append(Event("Normal", "RunSubmitted", f"submitting a Flower run of {spec.rounds} rounds"
                            + (f", resuming after round {done_rounds}"
                               if status_update.get("resumed_from_round") is not None else "")))
    running = sum(1 for s in sites if s.state in ("Running", "External"))
    conditions = set_condition(conditions, "Running", True, "RunInProgress",
                               f"round {done_rounds}/{spec.rounds}", gen, now)
    status = base.model_copy(update={
        "phase": "Running",
        "sites": sites,
        "sites_ready": f"{running}/{len(taking_part)}",
        "start_time": prev.start_time or now,
        "conditions": conditions,
        **status_update,
    })
    if prev.phase != "Running":
        events.append(Event("Normal", "Running", f"training on {', '.join(taking_part)}"))
    create = tuple(s for s in in_cluster if s not in obs.jobs)
    return Decision(status, submit_run=submit, create_jobs=create, events=tuple(events))
