"""kopf handlers, registered on import (so `kopf run -m pollinate_operator.handlers` works)."""

from __future__ import annotations

import logging
import random

import kopf
from prometheus_client import start_http_server

from ..settings import Settings
from . import federation, traininground
from .level_triggered import watch_only_ours

SETTINGS = Settings.from_env()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, logger: logging.Logger, **_) -> None:
    settings.persistence.finalizer = "pollinate.dev/finalizer"
    # One replica is the supported mode; should a second start anyway (a rolling update, a
    # developer's laptop), different priorities make one of them wait instead of both freezing.
    settings.peering.name = "pollinate-operator"
    settings.peering.priority = random.randint(0, 32767)
    settings.peering.mandatory = False
    settings.peering.clusterwide = not SETTINGS.namespaced
    if SETTINGS.namespaced:
        settings.scanning.disabled = True
    # Our handlers post their own Events; log lines stay logs.
    settings.posting.level = logging.WARNING
    # Bounded watch requests: a silently dead connection is replaced, not waited on forever.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    watch_only_ours(settings)
    settings.networking.request_timeout = 60
    settings.execution.max_workers = 32
    # A deleted object keeps its finalizer until its resync timer has stopped; a timer caught
    # mid-pass is checked again only after this many seconds (kopf's default: 60), which held
    # deletions up for a minute whenever the pass and the delete coincided.
    settings.background.cancellation_polling = 1
    if SETTINGS.metrics_port:
        start_http_server(SETTINGS.metrics_port)
        logger.info("metrics on :%d/metrics", SETTINGS.metrics_port)


federation.register(SETTINGS)
traininground.register(SETTINGS)
