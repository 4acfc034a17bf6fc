"""The operator never takes over an object it did not create (pure logic: clients/kube.py's
ownership check and the Federation's status when a name is taken)."""

from __future__ import annotations

import pytest
from pollinate_operator.api.federation import FederationStatus
from pollinate_operator.clients.kube import NotOurs, check_ours
from pollinate_operator.reconcile.federation import blocked_status

OURS = "0b7c4a9e-1111-4111-8111-000000000001"


def secret(*refs: dict) -> dict:
    return {"kind": "Secret", "metadata": {"name": "clinical-notes-ca", "namespace": "research",
                                           "ownerReferences": list(refs)}}


def ref(uid: str, controller: bool = True, kind: str = "Federation", name: str = "clinical-notes") -> dict:
    return {"apiVersion": "pollinate.dev/v1alpha1", "kind": kind, "name": name, "uid": uid,
            "controller": controller}


def test_nothing_there_or_our_own_may_be_applied() -> None:
    check_ours(None, OURS)
    check_ours(secret(ref(OURS)), OURS)


@pytest.mark.parametrize(("existing", "controller"), [
    (secret(), "none"),  # made by a person, or planted
    (secret(ref(OURS, controller=False)), "none"),  # merely referring to us is not ours
    # A Federation deleted and created again under the same name has another uid.
    (secret(ref("another-uid", name="clinical-notes")), "Federation clinical-notes"),
    (secret(ref("x", kind="Deployment", name="someone-else")), "Deployment someone-else"),
])
def test_anything_else_is_refused_naming_the_object_and_its_controller(existing: dict,
                                                                       controller: str) -> None:
    with pytest.raises(NotOurs) as refused:
        check_ours(existing, OURS)
    message = str(refused.value)
    assert "Secret research/clinical-notes-ca already exists and is not this object's" in message
    assert f"(its controller: {controller})" in message and "delete or rename it" in message


@pytest.mark.parametrize(("before", "after"), [(None, "Pending"), ("Pending", "Pending"),
                                               ("Ready", "Degraded")])
def test_a_taken_name_makes_the_federation_not_ready_saying_which(before, after) -> None:
    status = blocked_status(FederationStatus(phase=before), "NameConflict", "Secret x/y already exists", 3)
    assert status.phase == after and status.observed_generation == 3
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "NameConflict")
    assert ready.message == "Secret x/y already exists"
