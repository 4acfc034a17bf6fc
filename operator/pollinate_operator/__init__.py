"""Pollinate's Kubernetes operator: Federation and TrainingRound, reconciled with kopf."""

__version__ = "0.1.0"
