"""Pollinate's federated LoRA engine: Flower server and client apps and the client CLI."""

__version__ = "0.1.0"
