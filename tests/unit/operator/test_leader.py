"""Leader election on a Lease (pollinate_operator.leader): who may hold it, and two replicas
against one Lease kept in memory with the API server's optimistic concurrency (a write on a
stale resourceVersion is a 409). The real API server is in test_operator_flower.py."""

from __future__ import annotations

import copy
import datetime as dt
import threading

import pytest
from kubernetes.client.rest import ApiException
from pollinate_operator.leader import LeaderElection, LeaseState, may_hold

T0 = dt.datetime(2026, 12, 8, 12, 0, tzinfo=dt.UTC)
LEASE = dt.timedelta(seconds=15)


@pytest.mark.parametrize(("lease", "now", "allowed"), [
    (None, T0, True),
    (LeaseState(None, None, LEASE), T0, True),  # released
    (LeaseState("me", T0, LEASE), T0, True),
    (LeaseState("other", T0, LEASE), T0 + dt.timedelta(seconds=14), False),
    (LeaseState("other", T0, LEASE), T0 + dt.timedelta(seconds=15), True),  # it died
    (LeaseState("other", None, LEASE), T0, True),
])
def test_who_may_hold_the_lease(lease: LeaseState | None, now: dt.datetime, allowed: bool) -> None:
    assert may_hold(lease, "me", now) is allowed


class MemoryLeases:
    """CoordinationV1Api's lease calls, for one Lease, with resourceVersion conflicts."""

    def __init__(self) -> None:
        self.lease = None
        self.version = 0
        self.lock = threading.Lock()

    def read_namespaced_lease(self, name, namespace):
        with self.lock:
            if self.lease is None:
                raise ApiException(status=404)
            return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace, body):
        with self.lock:
            if self.lease is not None:
                raise ApiException(status=409)
            self.version += 1
            body.metadata.resource_version = str(self.version)
            self.lease = copy.deepcopy(body)

    def replace_namespaced_lease(self, name, namespace, body):
        with self.lock:
            if body.metadata.resource_version != self.lease.metadata.resource_version:
                raise ApiException(status=409)
            self.version += 1
            body.metadata.resource_version = str(self.version)
            self.lease = copy.deepcopy(body)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


def election(me: str, api: MemoryLeases, clock: Clock) -> LeaderElection:
    e = LeaderElection("hub", me, clock=clock, retry_seconds=0.0, renew_seconds=0.01)
    e._api = lambda: api  # type: ignore[method-assign]
    return e


def test_one_replica_leads_the_other_stands_by_and_takes_over_when_the_leader_stops_renewing() -> None:
    api, clock = MemoryLeases(), Clock()
    a, b = election("a", api, clock), election("b", api, clock)
    assert a._try() and not b._try()
    clock.now += dt.timedelta(seconds=10)
    assert a._try() and not b._try()  # renewed: b waits a whole lease again
    clock.now += dt.timedelta(seconds=14)
    assert not b._try()
    clock.now += dt.timedelta(seconds=1)  # a has not renewed for 15 s: it is gone
    assert b._try()
    assert api.lease.spec.holder_identity == "b" and api.lease.spec.lease_transitions == 1
    # The old leader finds the Lease taken: it must stop, not fight for it.
    lost = threading.Event()
    a.keep(on_lost=lost.set).join(timeout=5)
    assert lost.is_set() and a.lost.is_set()


def test_a_released_lease_is_taken_at_once() -> None:
    api, clock = MemoryLeases(), Clock()
    a, b = election("a", api, clock), election("b", api, clock)
    assert a._try()
    a.release()
    assert api.lease.spec.holder_identity is None
    assert b._try()


def test_two_replicas_racing_for_a_free_lease_get_one_leader() -> None:
    api, clock = MemoryLeases(), Clock()
    a, b = election("a", api, clock), election("b", api, clock)
    stale = api  # both read "no Lease", both try to create it: the API server lets one
    assert a._try()
    assert not b._try()
    assert stale.lease.spec.holder_identity == "a"
