"""The kopf settings the operator starts with: the ones whose defaults bit us."""

from __future__ import annotations

import dataclasses
import logging

import kopf
import pytest
from pollinate_operator import handlers


@pytest.fixture(autouse=True)
def _no_metrics_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "SETTINGS", dataclasses.replace(handlers.SETTINGS, metrics_port=0))


def configured() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    handlers.configure(settings=settings, logger=logging.getLogger("test"))
    return settings


def test_a_deleted_object_loses_its_finalizer_soon_after_its_timer_stops() -> None:
    # kopf's default re-checks a timer caught mid-pass a minute later, so a delete that met
    # a resync pass waited that minute (a CI run's `kubectl delete --timeout=60s` failed).
    assert configured().background.cancellation_polling <= 2


def test_watches_are_bounded_so_a_silently_dead_connection_is_replaced() -> None:
    watching = configured().watching
    assert watching.server_timeout and watching.client_timeout
    assert watching.client_timeout > watching.server_timeout


def test_our_finalizer_and_peering_name() -> None:
    settings = configured()
    assert settings.persistence.finalizer == "pollinate.dev/finalizer"
    assert settings.peering.name == "pollinate-operator"
