"""Typed models of the Pollinate API (`crds/` is the definition; a test keeps them equal)."""

from .conditions import Condition, condition_is, set_condition
from .federation import FederationSpec, FederationStatus, Site
from .traininground import RoundMetrics, SiteStatus, TrainingRoundSpec, TrainingRoundStatus

__all__ = [
    "Condition",
    "FederationSpec",
    "FederationStatus",
    "RoundMetrics",
    "Site",
    "SiteStatus",
    "TrainingRoundSpec",
    "TrainingRoundStatus",
    "condition_is",
    "set_condition",
]
