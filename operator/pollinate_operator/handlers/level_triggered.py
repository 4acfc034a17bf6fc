"""One way to wire a resource's reconcile function into kopf, shared by both resources."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from ..api.base import ApiModel
from ..clients import kube
from ..manifests.names import MANAGED_BY
from ..metrics import observe_reconcile
from ..settings import Settings

GROUP, VERSION = "pollinate.dev", "v1alpha1"
# Set on a Federation or TrainingRound when one of its children changed: its next pass runs
# now instead of at the next timer tick (a deleted Job is recreated in about a second).
WAKE_ANNOTATION = f"{GROUP}/children-changed"
PLURALS = {"Federation": "federations", "TrainingRound": "trainingrounds"}
WAKE_AT_MOST_EVERY_SECONDS = 1.0

Reconcile = Callable[[str, str, kopf.Body, Settings, logging.Logger], ApiModel]


Getter = Callable[[str, str, str], dict | None]


def live_body(plural: str, namespace: str, name: str, get: Getter = kube.get_custom) -> kopf.Body | None:
    """The object as the API server has it now; None if it is gone or being deleted.

    kopf's cached body can outlive the object: after a watch reconnect it does not notice
    objects deleted meanwhile, and keeps firing their timers. A pass acting on such a ghost
    submitted a new Flower run every few seconds for a TrainingRound that no longer existed
    (its status writes failed, so each pass found the old run gone): seen in CI. A fresh read
    per pass costs one GET and also gives the pass the latest status.
    """
    fresh = get(plural, namespace, name)
    if fresh is None or (fresh.get("metadata") or {}).get("deletionTimestamp"):
        return None
    return kopf.Body(fresh)


def run_pass(plural: str, kind: str, reconcile: Reconcile, settings: Settings, name: str,
             namespace: str, patch: kopf.Patch, memo: kopf.Memo, logger: logging.Logger,
             get: Getter = kube.get_custom) -> None:
    """One reconcile pass of one object, its status written through kopf's `patch`."""
    # The timer and the event handlers may fire together; passes must not interleave.
    lock = memo.setdefault("lock", threading.Lock())
    with lock:
        memo["last_pass"] = time.monotonic()
        body = live_body(plural, namespace, name, get)
        if body is None:
            # Gone, or being deleted: the deletion handler owns it now, and a status patch
            # here would race kopf's removal of its finalizer.
            logger.debug("%s %s/%s is gone or being deleted: no pass", kind, namespace, name)
            return
        with observe_reconcile(kind):
            status = reconcile(name, namespace, body, settings, logger)
    wire = status.to_wire()
    before = (body.get("status") or {}).get("phase")
    if wire.get("phase") != before:
        why = "; ".join(f"{c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}"
                        for c in wire.get("conditions", []) if c.get("message"))
        logger.info("phase %s -> %s%s", before, wire.get("phase"), f" ({why})" if why else "")
    patch.status.update(status.merge_patch_over(dict(body.get("status") or {})))


def timer_pass_due(settled: bool, since_last: float | None, settings: Settings) -> bool:
    """Whether a timer tick runs a pass: every `resync_seconds` while the object works towards
    something (a server starting, a run under way), every `settled_resync_seconds` once it has
    settled. A settled object is woken at once by what can unsettle it (its spec, its
    children, a TrainingRound publishing an adapter): the timer is only the safety net there,
    and at 300 objects a 10 s net kept the operator busy on passes that changed nothing."""
    if since_last is None:
        return True
    interval = settings.settled_resync_seconds if settled else settings.resync_seconds
    # Ticks come every resync_seconds, each a little late: due within half a tick counts.
    return since_last >= interval - settings.resync_seconds / 2


def on_tick(handler: Callable[..., None], settled: Callable[[Mapping[str, Any]], bool],
            settings: Settings) -> Callable[..., None]:
    """The timer's handler: `handler`, when timer_pass_due says this tick is due."""

    def tick(name: str, namespace: str, body: kopf.Body, patch: kopf.Patch,
             memo: kopf.Memo, logger: logging.Logger, **_) -> None:
        last = memo.get("last_pass")
        if timer_pass_due(settled(body.get("status") or {}),
                          None if last is None else time.monotonic() - last, settings):
            handler(name=name, namespace=namespace, body=body, patch=patch, memo=memo, logger=logger)

    return tick


def reconcile_on_every_pass(plural: str, kind: str, reconcile: Reconcile, settings: Settings,
                            settled: Callable[[Mapping[str, Any]], bool] = lambda status: False,
                            ) -> None:
    """Run `reconcile` on create, on a spec change, when the operator starts, when a child
    changes, and on a timer (level-triggered: a finished round or a lost registration is seen
    even if no event says so), one pass at a time per object, and store the status it returns."""

    def handler(name: str, namespace: str, body: kopf.Body, patch: kopf.Patch,
                memo: kopf.Memo, logger: logging.Logger, **_) -> None:
        if body.meta.get("deletionTimestamp"):
            return  # the cached body already says so: no need to ask
        run_pass(plural, kind, reconcile, settings, name, namespace, patch, memo, logger)

    handler.__name__ = handler.__qualname__ = kind  # kopf's handler id
    kopf.timer(GROUP, VERSION, plural, id=kind, interval=settings.resync_seconds,
               initial_delay=settings.resync_seconds)(on_tick(handler, settled, settings))
    for register in (
        kopf.on.update(GROUP, VERSION, plural, field="spec"),
        kopf.on.update(GROUP, VERSION, plural, field=("metadata", "annotations", WAKE_ANNOTATION),
                       id=f"{kind}-children-changed"),
        kopf.on.create(GROUP, VERSION, plural),
        kopf.on.resume(GROUP, VERSION, plural),
    ):
        register(handler)


def wake(plural: str, namespace: str, name: str) -> None:
    """Make the object's next pass run now (see WAKE_ANNOTATION); a missing object is fine."""
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    kube.annotate_custom(plural, namespace, name, {WAKE_ANNOTATION: stamp})


Owner = tuple[str, str, str]  # (plural, namespace, name)


def owner_to_wake(child: Mapping[str, Any]) -> Owner | None:
    """(plural, namespace, name) of the Pollinate object that controls `child`, if any."""
    meta = child.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("apiVersion") == f"{GROUP}/{VERSION}" \
                and ref.get("kind") in PLURALS:
            return PLURALS[ref["kind"]], meta.get("namespace", ""), ref["name"]
    return None


class WakeLimiter:
    """At most one wake per owner per `every` seconds, without losing the last change: a
    change inside the window is woken at the window's end, once however many came. (Dropping
    it instead left a Job deleted just after a sibling changed for the 10 s timer to find:
    the p99 of a recreate at scale.)"""

    def __init__(self, every: float = WAKE_AT_MOST_EVERY_SECONDS) -> None:
        self.every = every
        self._last: dict[Owner, float] = {}
        self._scheduled: set[Owner] = set()
        self._lock = threading.Lock()

    def admit(self, owner: Owner, now: float) -> float | None:
        """Seconds until `owner` may be woken (0: now; the caller then wakes it), or None when
        a wake is already scheduled and will see this change too."""
        with self._lock:
            if owner in self._scheduled:
                return None
            wait = self._last.get(owner, float("-inf")) + self.every - now
            if wait > 0:
                self._scheduled.add(owner)
                return wait
            self._last[owner] = now
            return 0.0

    def fired(self, owner: Owner, now: float) -> None:
        """A scheduled wake is being sent now."""
        with self._lock:
            self._scheduled.discard(owner)
            self._last[owner] = now


# The child kinds wake_owners_of watches: (group, version, plural).
WATCHED_CHILDREN: list[tuple[str, str, str]] = []


def watch_only_ours(settings: kopf.OperatorSettings) -> None:
    """Have the API server send the child watches only objects this operator manages (a label
    selector on the watch), not every Secret, Service or Job in the cluster: less to receive
    and decode, and no other Secret's data passes through the operator at all."""
    from kopf._cogs.structs.references import Selector  # kopf has no public name for it

    selector = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    for group, version, plural in WATCHED_CHILDREN:
        settings.watching.label_selectors[Selector(group, version, plural)] = selector


def wake_owners_of(group: str, version: str, plural: str) -> None:
    """When one of our children of this kind changes (deleted, its pods progress), forget what
    was applied to it and wake its owner's pass through an annotation (WakeLimiter: at most
    once a second per owner, the last change never dropped)."""
    WATCHED_CHILDREN.append((group, version, plural))
    limiter = WakeLimiter()

    def wake_later(owner: Owner) -> None:
        limiter.fired(owner, time.monotonic())
        try:
            wake(*owner)
        except Exception as err:  # a timer thread has no caller to raise to; the resync remains
            logging.getLogger(__name__).warning("could not wake %s %s/%s: %s", *owner, err)

    def child_changed(event: Mapping[str, Any], body: kopf.Body, logger: logging.Logger, **_) -> None:
        if event.get("type") is None:  # kopf's initial listing: the owners' resume pass covers it
            return
        kube.APPLIED.forget(body)
        owner = owner_to_wake(body)
        if owner is None:
            return
        wait = limiter.admit(owner, time.monotonic())
        if wait is None:
            return
        if wait > 0:
            timer = threading.Timer(wait, wake_later, args=(owner,))
            timer.daemon = True
            timer.start()
            return
        wake(*owner)

    child_changed.__name__ = child_changed.__qualname__ = f"{plural}-changed"
    kopf.on.event(group, version, plural, labels=dict(MANAGED_BY))(child_changed)
