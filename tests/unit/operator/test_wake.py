"""Which Pollinate object a child's change wakes (pure logic of handlers/level_triggered)."""

from __future__ import annotations

from pollinate_operator.handlers.level_triggered import owner_to_wake


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
