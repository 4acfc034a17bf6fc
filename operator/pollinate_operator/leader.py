"""One operator at a time: leader election on a coordination.k8s.io Lease, as Kubernetes' own
controllers do it (`--leader-elect`).

Two replicas of the operator (or one that a node kept running while its replacement started)
would both reconcile: both submit runs, both apply children. With `--leader-elect` a replica
reconciles only while it holds the Lease `pollinate-operator` in its own namespace; it renews
the Lease every `RENEW_SECONDS`, and a standby takes it once it has gone `LEASE_SECONDS`
without renewal (the leader died) or at once when the leader let it go (a clean shutdown).
A leader that cannot renew for `LEASE_SECONDS` stops reconciling and exits: by then a standby
may hold the Lease, and two leaders must never act at once.

Why not kopf's own peering: it pauses operators of lower priority, but replicas of one
Deployment have the same priority (kopf then runs both), and it needs cluster-wide CRDs of
its own.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

LEASE_NAME = "pollinate-operator"
LEASE_SECONDS = 15
RENEW_SECONDS = 5
RETRY_SECONDS = 2


@dataclass(frozen=True)
class LeaseState:
    """A Lease as read: who holds it and since when it was last renewed."""

    holder: str | None
    renewed: dt.datetime | None
    duration: dt.timedelta
    transitions: int = 0


def may_hold(lease: LeaseState | None, me: str, now: dt.datetime) -> bool:
    """Whether `me` may take or keep the Lease: nobody holds it, `me` does, or its holder
    has not renewed it within its duration (a leader that died)."""
    if lease is None or not lease.holder or lease.holder == me:
        return True
    return lease.renewed is None or now >= lease.renewed + lease.duration


def identity(hostname: str) -> str:
    """The pod's name, and a suffix so that a restarted process is a new holder."""
    return f"{hostname or 'pollinate-operator'}-{uuid.uuid4().hex[:8]}"


class LeaderElection:
    """The Lease `name` in `namespace`, taken and kept by `me`."""

    def __init__(self, namespace: str, me: str, name: str = LEASE_NAME,
                 lease_seconds: int = LEASE_SECONDS, renew_seconds: float = RENEW_SECONDS,
                 retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self.namespace, self.me, self.name = namespace, me, name
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.lost = threading.Event()
        self._stop = threading.Event()

    # ---- the API -------------------------------------------------------------------------
    def _api(self):
        import kubernetes

        from .clients.kube import api_client

        return kubernetes.client.CoordinationV1Api(api_client())

    def _try(self) -> bool:
        """One attempt to take or renew the Lease; whether `me` holds it afterwards. A write
        that lost a race (409: someone else wrote first) is a no."""
        import kubernetes
        from kubernetes.client.rest import ApiException

        api, now = self._api(), self.clock()
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            body = kubernetes.client.V1Lease(
                metadata=kubernetes.client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=kubernetes.client.V1LeaseSpec(
                    holder_identity=self.me, lease_duration_seconds=self.lease_seconds,
                    acquire_time=now, renew_time=now, lease_transitions=0))
            try:
                api.create_namespaced_lease(self.namespace, body)
            except ApiException as clash:
                if clash.status == 409:
                    return False
                raise
            return True
        spec = lease.spec
        state = LeaseState(spec.holder_identity, spec.renew_time,
                           dt.timedelta(seconds=spec.lease_duration_seconds or self.lease_seconds),
                           spec.lease_transitions or 0)
        if not may_hold(state, self.me, now):
            return False
        if state.holder != self.me:
            spec.acquire_time = now
            spec.lease_transitions = state.transitions + 1
        spec.holder_identity, spec.renew_time = self.me, now
        spec.lease_duration_seconds = self.lease_seconds
        try:
            api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as clash:
            if clash.status == 409:
                return False
            raise
        return True

    # ---- the loop --------------------------------------------------------------------------
    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait until `me` holds the Lease (True), or `stop` is set (False)."""
        announced = False
        while not (stop and stop.is_set()):
            try:
                if self._try():
                    log.info("became the leader (Lease %s/%s, as %s)", self.namespace, self.name, self.me)
                    return True
            except Exception as err:  # the API server briefly away: try again
                log.warning("could not read or write Lease %s/%s: %s", self.namespace, self.name, err)
            if not announced:
                log.info("standing by: Lease %s/%s is held by another operator", self.namespace, self.name)
                announced = True
            time.sleep(self.retry_seconds)
        return False

    def keep(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew the Lease in the background; call `on_lost` once it cannot be kept."""
        def renew() -> None:
            last = time.monotonic()
            while not self._stop.wait(self.renew_seconds):
                try:
                    if self._try():
                        last = time.monotonic()
                        continue
                    log.error("another operator took Lease %s/%s", self.namespace, self.name)
                except Exception as err:
                    if time.monotonic() - last < self.lease_seconds - self.renew_seconds:
                        log.warning("could not renew Lease %s/%s: %s", self.namespace, self.name, err)
                        continue
                    log.error("could not renew Lease %s/%s for %d s: %s", self.namespace,
                              self.name, self.lease_seconds, err)
                self.lost.set()
                on_lost()
                return

        thread = threading.Thread(target=renew, name="lease-renewal", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Let the Lease go at once (a clean shutdown), so a standby need not wait it out."""
        self._stop.set()
        if self.lost.is_set():
            return
        try:
            api = self._api()
            lease = api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.me:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                api.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("released Lease %s/%s", self.namespace, self.name)
        except Exception as err:  # a standby takes it when it expires
            log.warning("could not release Lease %s/%s: %s", self.namespace, self.name, err)


def install_stop_signals(stop: threading.Event) -> None:
    """SIGTERM and SIGINT while standing by end the wait (kopf installs its own once it runs)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
