"""kopf wiring for TrainingRound: observe, `reconcile.traininground.decide`, act, write status."""

from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import kopf

from ..api.federation import FederationSpec, FederationStatus
from ..api.traininground import TrainingRoundSpec, TrainingRoundStatus
from ..clients import kube, storage
from ..clients.flower import FlowerControl, FlowerRefused, FlowerUnavailable
from ..manifests import clients as client_manifests
from ..manifests import names, server
from ..manifests.run import run_config, run_key
from ..manifests.security import owner_reference
from ..metrics import count_training_round
from ..reconcile import traininground as plan
from ..reconcile.federation import sites_by_key
from ..settings import Settings
from .federation import list_flower_nodes, open_control, public_pem
from .level_triggered import reconcile_on_every_pass, wake, wake_owners_of


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def observe_jobs(namespace: str, training_round: str) -> dict[str, plan.JobObserved]:
    selector = names.training_round_selector(training_round)
    pods_by_site: dict[str, list[plan.PodObserved]] = {}
    for pod in sorted(kube.list_pods(namespace, selector),
                      key=lambda p: p["metadata"].get("creationTimestamp", "")):
        site = pod["metadata"]["labels"].get(names.SITE_LABEL)
        scheduled = next((c for c in pod.get("status", {}).get("conditions", [])
                          if c["type"] == "PodScheduled"), None)
        unschedulable = (scheduled and scheduled["status"] == "False"
                         and scheduled.get("reason") == "Unschedulable")
        pods_by_site.setdefault(site, []).append(plan.PodObserved(
            phase=pod.get("status", {}).get("phase", "Pending"),
            node=pod["spec"].get("nodeName"),
            unschedulable_since=_parse_time(scheduled.get("lastTransitionTime")) if unschedulable else None,
            message=scheduled.get("message", "") if unschedulable else "",
        ))
    jobs: dict[str, plan.JobObserved] = {}
    for job in kube.list_jobs(namespace, selector):
        site = job["metadata"]["labels"].get(names.SITE_LABEL)
        status = job.get("status", {})
        failed = any(c["type"] == "Failed" and c["status"] == "True" for c in status.get("conditions", []))
        jobs[site] = plan.JobObserved(
            name=job["metadata"]["name"], active=status.get("active", 0) or 0,
            succeeded=status.get("succeeded", 0) or 0, failed=failed,
            pods=tuple(pods_by_site.get(site, [])))
    return jobs


def _find_run(control: FlowerControl, namespace: str, training_round: str, uid: str) -> int | None:
    """A live run of this TrainingRound the server already has (submitted by a pass whose
    status write was lost): adopted instead of submitting a duplicate. One of an earlier
    TrainingRound of the same name (another uid) is not this one's."""
    for run in control.list_runs():
        config = run.override_config
        if (config.get("training-round") == training_round and config.get("namespace") == namespace
                and config.get("training-round-uid") == uid and run.status != "finished"):
            return run.run_id
    return None


def _registered_nodes(control: FlowerControl, federation: str, namespace: str,
                      fed: FederationSpec) -> dict[str, int]:
    """Site name -> node id of the Federation's sites whose current key the server holds,
    matched by key (a node's name is whatever its registration said)."""
    sites = {s.name for s in fed.sites}
    keys = {s.labels[names.SITE_LABEL]: public_pem(s.data["site.pub"])
            for s in kube.list_secrets(namespace, names.site_secrets_selector(federation))
            if s.labels[names.SITE_LABEL] in sites and "site.pub" in s.data}
    matched = sites_by_key(keys, list_flower_nodes(control))
    return {site: int(node_id) for site, node_id in matched.items()}


@dataclass
class FlowerObserved:
    """What one pass learnt from the Federation's Flower server (nothing if unreachable)."""

    run_id: int | None
    run: plan.RunObserved | None = None
    registered: dict[str, int] = field(default_factory=dict)
    reachable: bool = False
    control: FlowerControl | None = None  # open while the pass may still start or stop a run


def reconcile(name: str, namespace: str, body: kopf.Body, settings: Settings,
              logger: logging.Logger) -> TrainingRoundStatus:
    spec = TrainingRoundSpec.model_validate(dict(body["spec"]))
    previous = TrainingRoundStatus.from_stored(dict(body.get("status") or {}))
    fed_body = kube.get_custom("federations", namespace, spec.federation)
    fed = FederationSpec.model_validate(fed_body["spec"]) if fed_body else None
    fed_status = FederationStatus.from_stored(fed_body.get("status")) if fed_body else None
    fed_ready = bool(fed_status and fed_status.phase == "Ready")

    run_id = int(previous.run_id) if previous.run_id else None
    live = fed is not None and previous.phase not in plan.TERMINAL
    uid = str(body.meta.get("uid") or "")
    key = run_key(name, uid)

    def observe_flower() -> FlowerObserved:
        if not (live and (fed_ready or previous.run_id)):
            return FlowerObserved(run_id)
        assert fed is not None
        control = open_control(spec.federation, namespace, fed, settings, fed_body["metadata"]["uid"])
        if control is None:
            return FlowerObserved(run_id)
        try:
            found = run_id if run_id is not None else _find_run(control, namespace, name, uid)
            state = control.get_run(found) if found is not None else None
            run = plan.RunObserved(state.status, state.sub_status, state.details) if state else None
            registered = (_registered_nodes(control, spec.federation, namespace, fed)
                          if run is None and fed.server.node_authentication else {})
            return FlowerObserved(found, run, registered, True, control)
        except (FlowerUnavailable, FlowerRefused) as err:
            # Refused: the server was started before its token Secret was mounted, or is not ours.
            logger.info("Flower server not reachable: %s", err)
            control.close()
            return FlowerObserved(run_id)

    def observe_progress() -> plan.Progress | None:
        return storage.read_progress(fed, spec.federation, namespace, key) if live and fed else None

    # Three independent reads (the Flower server, S3, the API server): side by side, a pass
    # costs the slowest of them, not their sum.
    with ThreadPoolExecutor(max_workers=3) as pool:
        flower_future = pool.submit(observe_flower)
        progress_future = pool.submit(observe_progress)
        jobs_future = pool.submit(observe_jobs, namespace, name)
        flower, progress, jobs = flower_future.result(), progress_future.result(), jobs_future.result()
    run_id, control = flower.run_id, flower.control

    observed = plan.TrainingRoundObserved(
        now=dt.datetime.now(dt.UTC), generation=body.meta.get("generation", 0),
        federation=fed, federation_ready=fed_ready, jobs=jobs,
        run=flower.run, server_reachable=flower.reachable, progress=progress,
        registered_nodes=flower.registered, run_key=key,
        previous=previous.model_copy(update={"run_id": str(run_id) if run_id else None}),
    )
    decision = plan.decide(name, spec, observed)
    status = decision.status
    try:
        if decision.stop_run and control and run_id is not None:
            control.stop_run(run_id)
            logger.info("stopped Flower run %s", run_id)
        if decision.submit_run and control and fed is not None:
            config = run_config(name, namespace, spec, spec.federation, fed, flower.registered, uid)
            run_id = control.start_run(config)
            status = status.model_copy(update={"run_id": str(run_id)})
            logger.info("submitted Flower run %s (%d rounds)", run_id, spec.rounds)
    finally:
        if control:
            control.close()
    if fed is not None and decision.create_jobs:
        address = server.in_cluster_address(spec.federation, namespace, settings)
        jobs = []
        for site_name in decision.create_jobs:
            site = fed.site(site_name)
            assert site is not None
            job = client_manifests.client_job(name, namespace, spec, spec.federation, fed, site, address)
            job["metadata"]["ownerReferences"] = [owner_reference(dict(body))]
            jobs.append(job)
        # One request each; in parallel, a round of ten sites starts in one API round trip.
        with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
            list(pool.map(kube.apply, jobs))
    for site_name in decision.delete_jobs:
        kube.delete("batch/v1", "Job", namespace, names.client_job(name, site_name))
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    if status.adapter_version and status.adapter_version != previous.adapter_version:
        # The Federation shows the latest version; a Ready one polls only now and then.
        wake("federations", namespace, spec.federation)
    count_training_round(namespace, previous, status, plan.TERMINAL)
    return status


def stop_run_on_delete(name: str, namespace: str, body: kopf.Body, settings: Settings,
                       logger: logging.Logger) -> None:
    status = TrainingRoundStatus.from_stored(dict(body.get("status") or {}))
    if not status.run_id or status.phase in plan.TERMINAL:
        return
    fed_body = kube.get_custom("federations", namespace, body["spec"]["federation"])
    if fed_body is None:
        return
    fed = FederationSpec.model_validate(fed_body["spec"])
    control = open_control(body["spec"]["federation"], namespace, fed, settings,
                           fed_body["metadata"]["uid"])
    if control is None:
        return
    try:
        with control:
            # Idempotent: a retried deletion, or a run that ended meanwhile, finds nothing to stop.
            state = control.get_run(int(status.run_id))
            if state is None or state.finished:
                return
            control.stop_run(int(status.run_id))
            logger.info("stopped Flower run %s: its TrainingRound was deleted", status.run_id)
    except FlowerUnavailable as err:
        logger.warning("could not stop Flower run %s: %s", status.run_id, err)


def register(settings: Settings) -> None:
    reconcile_on_every_pass("trainingrounds", "traininground", reconcile, settings, settled=plan.settled)
    wake_owners_of("batch", "v1", "jobs")

    @kopf.on.delete("pollinate.dev", "v1alpha1", "trainingrounds", optional=True)
    def training_round_deleted(name: str, namespace: str, body: kopf.Body,
                               logger: logging.Logger, **_) -> None:
        stop_run_on_delete(name, namespace, body, settings, logger)
