"""Where a site trains: CUDA (optionally with 4-bit NF4 base weights), Apple MPS, or the CPU.

The decision itself (`decide_device`) is a pure function of what the machine offers, so it is
tested as a table; `choose_device` probes torch and bitsandbytes and then asks it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch

log = logging.getLogger(__name__)

DeviceName = Literal["cuda", "mps", "cpu"]
DEVICES: tuple[str, ...] = ("cuda", "mps", "cpu")
QUANTIZATIONS: tuple[str, ...] = ("nf4", "none")


class DeviceError(RuntimeError):
    """The requested device or quantization cannot be used on this machine."""


@dataclass(frozen=True)
class Capabilities:
    """What this machine offers; filled by `probe_capabilities`, or by hand in tests."""

    cuda: bool = False
    cuda_bf16: bool = False
    mps: bool = False
    bitsandbytes: bool = False


@dataclass(frozen=True)
class DeviceChoice:
    """The device to train on, the dtype of the (non-quantized) base weights and activations, and
    whether the base weights are 4-bit NF4 (`quantization == "nf4"`) or not (`None`)."""

    device: DeviceName
    dtype: Literal["float32", "float16", "bfloat16"]
    quantization: Literal["nf4"] | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        quant = f" + {self.quantization}" if self.quantization else ""
        return f"{self.device} {self.dtype}{quant}"


def decide_device(
    override: str | None, quantization: str | None, caps: Capabilities
) -> DeviceChoice:
    """Choose the device from an explicit override (wins when available) or the best one present:
    CUDA, then MPS, then CPU.

    NF4 (a site's `quantization: nf4`) is honoured on CUDA and on the CPU, where bitsandbytes has a
    backend; it is dropped with a warning on MPS, which bitsandbytes does not support.
    """
    override = (override or "").strip().lower() or None
    if override == "auto":
        override = None
    if override is not None and override not in DEVICES:
        raise DeviceError(
            f"device {override!r} is not one of {', '.join(DEVICES)} (or 'auto' to choose)"
        )
    quant = (quantization or "none").strip().lower()
    if quant not in QUANTIZATIONS:
        raise DeviceError(
            f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
        )

    if override == "cuda" and not caps.cuda:
        raise DeviceError(
            "device 'cuda' was requested but torch sees no CUDA GPU "
            "(torch.cuda.is_available() is False: no GPU, no driver, or a CPU-only torch build)"
        )
    if override == "mps" and not caps.mps:
        raise DeviceError(
            "device 'mps' was requested but torch.backends.mps.is_available() is False "
            "(MPS needs Apple Silicon, macOS 12.3+ and an arm64 Python)"
        )
    device: DeviceName
    if override is not None:
        device = override  # type: ignore[assignment]
    elif caps.cuda:
        device = "cuda"
    elif caps.mps:
        device = "mps"
    else:
        device = "cpu"

    if device == "cuda":
        # bf16 keeps fp32's range, so no loss scaling is needed; older GPUs only have fp16.
        dtype = "bfloat16" if caps.cuda_bf16 else "float16"
    elif device == "mps":
        dtype = "float16"
    else:
        dtype = "float32"

    nf4: Literal["nf4"] | None = None
    if quant == "nf4":
        if device == "mps":
            log.warning("quantization nf4 is not available on MPS (no bitsandbytes backend); "
                        "training with float16 base weights instead")
        elif not caps.bitsandbytes:
            raise DeviceError(
                "quantization 'nf4' needs bitsandbytes, which is not importable here: "
                "install pollinate-runtime[cuda] (or pip install bitsandbytes)"
            )
        else:
            nf4 = "nf4"
    return DeviceChoice(device=device, dtype=dtype, quantization=nf4)


def probe_capabilities() -> Capabilities:
    cuda = torch.cuda.is_available()
    return Capabilities(
        cuda=cuda,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(),
        mps=torch.backends.mps.is_available(),
        # find_spec, not import: importing bitsandbytes is slow and logs warnings on CPU machines.
        bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
    )


def choose_device(override: str | None = None, quantization: str | None = None) -> DeviceChoice:
    """The device this process trains on; `override` is `cuda`, `mps`, `cpu` or None/`auto`."""
    choice = decide_device(override, quantization, probe_capabilities())
    log.info("training device: %s", choice.describe())
    if choice.device == "cpu":
        size_cpu_threads()
    return choice


CPU_MILLICORES_ENV = "POLLINATE_CPU_MILLICORES"  # set by the operator and the site chart
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def decide_cpu_threads(declared_millicores: int | None, quota_cpus: float | None, usable_cpus: int) -> int:
    """Threads for torch on the CPU: the fewest CPUs that any of the pod's declared CPU (its
    limit or request), its cgroup quota and the CPUs it may run on allow, at least one.

    torch's default is one thread per core it sees, and a pod sees every core of its node:
    three sites sharing two cores with two threads each ran a SmolLM2 step in 30-100 s, with
    one thread each in 7 s (the threads spin-wait for each other's cores)."""
    budget = float(max(usable_cpus, 1))
    if declared_millicores and declared_millicores > 0:
        budget = min(budget, declared_millicores / 1000)
    if quota_cpus and quota_cpus > 0:
        budget = min(budget, quota_cpus)
    return max(1, int(budget))


def cgroup_quota_cpus(cpu_max: str) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("<quota> <period>", or "max <period>")."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        return int(fields[0]) / int(fields[1])
    except (ValueError, ZeroDivisionError):
        return None


def cpu_threads(environ: dict[str, str] | None = None) -> int:
    """What `decide_cpu_threads` says for this process."""
    env = os.environ if environ is None else environ
    try:
        declared = int(env.get(CPU_MILLICORES_ENV, "") or 0) or None
    except ValueError:
        log.warning("%s=%r is not a whole number of millicores; ignored",
                    CPU_MILLICORES_ENV, env.get(CPU_MILLICORES_ENV))
        declared = None
    try:
        with open(CGROUP_CPU_MAX) as f:
            quota = cgroup_quota_cpus(f.read())
    except OSError:
        quota = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return decide_cpu_threads(declared, quota, usable)


def size_cpu_threads() -> None:
    """Set torch's intra-op threads from the CPU this pod may use, unless the person running it
    chose with OMP_NUM_THREADS (which torch already honours)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    threads = cpu_threads()
    if threads != torch.get_num_threads():
        log.info("torch CPU threads: %d (from the CPU this process may use)", threads)
        torch.set_num_threads(threads)
