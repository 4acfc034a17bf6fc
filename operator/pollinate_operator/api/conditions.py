"""Conditions as Kubernetes and Kubeflow use them: stable types and reasons a person can grep."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from .base import ApiModel

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    type: str
    status: ConditionStatus
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None
    observed_generation: int | None = None


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition],
    type: str,
    status: bool | ConditionStatus,
    reason: str,
    message: str = "",
    generation: int | None = None,
    now: str | None = None,
) -> list[Condition]:
    """Return `conditions` with `type` set; lastTransitionTime moves only when status changes."""
    status_str: ConditionStatus = (
        ("True" if status else "False") if isinstance(status, bool) else status
    )
    previous = next((c for c in conditions if c.type == type), None)
    changed = previous is None or previous.status != status_str
    updated = Condition(
        type=type,
        status=status_str,
        reason=reason,
        message=message,
        last_transition_time=(now or now_rfc3339()) if changed else previous.last_transition_time,
        observed_generation=generation,
    )
    return [updated if c.type == type else c for c in conditions] if previous else [
        *conditions, updated
    ]


def condition_is(conditions: list[Condition], type: str, status: ConditionStatus = "True") -> bool:
    return any(c.type == type and c.status == status for c in conditions)
