"""A real local Kubernetes control plane and S3 server for Pollinate's tests and demo."""

from .cluster import Ports, S3Settings, Testbed, TestbedError, build_binaries

__all__ = ["Ports", "S3Settings", "Testbed", "TestbedError", "build_binaries"]
