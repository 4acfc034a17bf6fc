"""One way to wire a resource's reconcile function into kopf, shared by both resources."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import kopf

from ..api.base import ApiModel
from ..metrics import observe_reconcile
from ..settings import Settings

GROUP, VERSION = "pollinate.dev", "v1alpha1"

Reconcile = Callable[[str, str, kopf.Body, Settings, logging.Logger], ApiModel]


def reconcile_on_every_pass(plural: str, kind: str, reconcile: Reconcile, settings: Settings) -> None:
    """Run `reconcile` on create, on a spec change, when the operator starts, and on a timer
    (level-triggered: a deleted child or a finished round is seen even if no event says so),
    one pass at a time per object, and store the status it returns."""

    def handler(name: str, namespace: str, body: kopf.Body, patch: kopf.Patch,
                memo: kopf.Memo, logger: logging.Logger, **_) -> None:
        if body.meta.get("deletionTimestamp"):
            # Being deleted: the deletion handler owns it now, and a status patch here would
            # race kopf's removal of its finalizer.
            return
        # The timer and the event handlers may fire together; passes must not interleave.
        lock = memo.setdefault("lock", threading.Lock())
        with lock, observe_reconcile(kind):
            status = reconcile(name, namespace, body, settings, logger)
        wire = status.to_wire()
        before = (body.get("status") or {}).get("phase")
        if wire.get("phase") != before:
            why = "; ".join(f"{c['type']}={c['status']} {c.get('reason', '')}: {c.get('message', '')}"
                            for c in wire.get("conditions", []) if c.get("message"))
            logger.info("phase %s -> %s%s", before, wire.get("phase"), f" ({why})" if why else "")
        patch.status.update(wire)

    handler.__name__ = handler.__qualname__ = kind  # kopf's handler id
    for register in (
        kopf.timer(GROUP, VERSION, plural, interval=settings.resync_seconds,
                   initial_delay=settings.resync_seconds),
        kopf.on.update(GROUP, VERSION, plural, field="spec"),
        kopf.on.create(GROUP, VERSION, plural),
        kopf.on.resume(GROUP, VERSION, plural),
    ):
        register(handler)
