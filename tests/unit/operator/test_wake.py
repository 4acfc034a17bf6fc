"""Which Pollinate object a child's change wakes (pure logic of handlers/level_triggered)."""

from __future__ import annotations

import pytest
from pollinate_operator.handlers.level_triggered import WakeLimiter, owner_to_wake


def child(*refs: dict) -> dict:
    return {"metadata": {"name": "notes-v1-hospital-a", "namespace": "research",
                         "ownerReferences": list(refs)}}


def test_a_job_wakes_the_training_round_that_controls_it() -> None:
    ref = {"apiVersion": "pollinate.dev/v1alpha1", "kind": "TrainingRound", "name": "notes-v1",
           "controller": True}
    assert owner_to_wake(child(ref)) == ("trainingrounds", "research", "notes-v1")


def test_a_deployment_wakes_its_federation() -> None:
    ref = {"apiVersion": "pollinate.dev/v1alpha1", "kind": "Federation", "name": "clinical-notes",
           "controller": True}
    assert owner_to_wake(child(ref)) == ("federations", "research", "clinical-notes")


def test_children_of_others_or_without_a_controller_wake_nothing() -> None:
    assert owner_to_wake(child()) is None
    assert owner_to_wake({"metadata": {}}) is None
    cron_job = {"apiVersion": "batch/v1", "kind": "CronJob", "name": "x", "controller": True}
    assert owner_to_wake(child(cron_job)) is None
    assert owner_to_wake(child({"apiVersion": "pollinate.dev/v1alpha1", "kind": "TrainingRound",
                                "name": "notes-v1", "controller": False})) is None


OWNER = ("trainingrounds", "research", "notes-v1")
OTHER = ("trainingrounds", "research", "notes-v2")


def test_the_first_change_wakes_its_owner_at_once() -> None:
    limiter = WakeLimiter(every=1.0)
    assert limiter.admit(OWNER, now=100.0) == 0.0


def test_a_change_inside_the_window_is_woken_at_its_end_not_dropped() -> None:
    limiter = WakeLimiter(every=1.0)
    limiter.admit(OWNER, now=100.0)
    assert limiter.admit(OWNER, now=100.25) == pytest.approx(0.75)


def test_further_changes_ride_on_the_scheduled_wake() -> None:
    limiter = WakeLimiter(every=1.0)
    limiter.admit(OWNER, now=100.0)
    limiter.admit(OWNER, now=100.25)
    assert limiter.admit(OWNER, now=100.5) is None
    limiter.fired(OWNER, now=101.0)
    # After the scheduled wake, the window starts again from it.
    assert limiter.admit(OWNER, now=101.5) == pytest.approx(0.5)
    assert limiter.admit(OWNER, now=102.5) is None  # still scheduled: not fired yet


def test_owners_are_limited_separately() -> None:
    limiter = WakeLimiter(every=1.0)
    limiter.admit(OWNER, now=100.0)
    assert limiter.admit(OTHER, now=100.1) == 0.0


def test_a_change_after_the_window_wakes_at_once() -> None:
    limiter = WakeLimiter(every=1.0)
    limiter.admit(OWNER, now=100.0)
    assert limiter.admit(OWNER, now=101.2) == 0.0


def test_every_child_watch_asks_the_api_server_only_for_the_operators_own_objects() -> None:
    import kopf
    from kopf._cogs.structs.references import Resource
    from pollinate_operator import handlers  # noqa: F401 - registers the watches
    from pollinate_operator.handlers.level_triggered import WATCHED_CHILDREN, watch_only_ours

    settings = kopf.OperatorSettings()
    watch_only_ours(settings)
    kinds = {plural for _, _, plural in WATCHED_CHILDREN}
    assert {"secrets", "services", "deployments", "ingresses", "networkpolicies", "jobs"} <= kinds
    for group, version, plural in WATCHED_CHILDREN:
        resource = Resource(group=group, version=version, plural=plural, namespaced=True)
        assert settings.watching.label_selectors.collect(resource) == [
            "app.kubernetes.io/managed-by=pollinate-operator"], plural
    # The operator's own resources are not narrowed: a user's Federation has no such label.
    federations = Resource(group="pollinate.dev", version="v1alpha1", plural="federations", namespaced=True)
    assert settings.watching.label_selectors.collect(federations) == []
