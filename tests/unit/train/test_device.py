"""Choosing the training device is a pure decision over what the machine offers."""

from __future__ import annotations

import pytest
from pollinate_runtime.train.device import Capabilities, DeviceChoice, DeviceError, decide_device

NOTHING = Capabilities()
CUDA = Capabilities(cuda=True, cuda_bf16=True, bitsandbytes=True)
OLD_CUDA = Capabilities(cuda=True, cuda_bf16=False, bitsandbytes=True)
CUDA_NO_BNB = Capabilities(cuda=True, cuda_bf16=True)
MAC = Capabilities(mps=True)
CPU_BNB = Capabilities(bitsandbytes=True)


@pytest.mark.parametrize(
    ("override", "quantization", "caps", "expected"),
    [
        (None, None, NOTHING, DeviceChoice("cpu", "float32")),
        ("auto", "none", NOTHING, DeviceChoice("cpu", "float32")),
        (None, None, CUDA, DeviceChoice("cuda", "bfloat16")),
        (None, None, OLD_CUDA, DeviceChoice("cuda", "float16")),
        (None, "nf4", CUDA, DeviceChoice("cuda", "bfloat16", "nf4")),
        (None, "NF4", OLD_CUDA, DeviceChoice("cuda", "float16", "nf4")),
        (None, None, MAC, DeviceChoice("mps", "float16")),
        (None, "nf4", MAC, DeviceChoice("mps", "float16")),  # dropped: no MPS backend
        ("cpu", None, CUDA, DeviceChoice("cpu", "float32")),  # the override wins
        ("CPU", "nf4", CUDA, DeviceChoice("cpu", "float32", "nf4")),
        ("mps", None, Capabilities(cuda=True, mps=True), DeviceChoice("mps", "float16")),
        ("cuda", None, CUDA, DeviceChoice("cuda", "bfloat16")),
        (None, "nf4", CPU_BNB, DeviceChoice("cpu", "float32", "nf4")),
    ],
)
def test_device_is_chosen_from_override_then_cuda_mps_cpu(override, quantization, caps, expected):
    assert decide_device(override, quantization, caps) == expected


@pytest.mark.parametrize(
    ("override", "quantization", "caps", "message"),
    [
        ("cuda", None, MAC, "device 'cuda' was requested but torch sees no CUDA GPU"),
        ("mps", None, CUDA, "device 'mps' was requested but torch.backends.mps.is_available()"),
        ("tpu", None, CUDA, "device 'tpu' is not one of cuda, mps, cpu"),
        (None, "int3", CUDA, "quantization 'int3' is not one of nf4, none"),
        (None, "nf4", CUDA_NO_BNB, "quantization 'nf4' needs bitsandbytes"),
    ],
)
def test_unavailable_device_or_quantization_is_a_clear_error(override, quantization, caps,
                                                              message):
    with pytest.raises(DeviceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        decide_device(override, quantization, caps)


def test_choice_is_frozen_and_names_its_torch_dtype():
    import torch

    choice = DeviceChoice("mps", "float16")
    assert choice.torch_dtype is torch.float16
    assert choice.describe() == "mps float16"
    with pytest.raises(AttributeError):
        choice.device = "cpu"  # type: ignore[misc]


# ---- CPU threads: from the CPU the pod may use, not the node's cores ------------------------
from pollinate_runtime.train.device import cgroup_quota_cpus, cpu_threads, decide_cpu_threads  # noqa: E402


@pytest.mark.parametrize(
    ("declared_millicores", "quota", "usable", "threads"),
    [
        (None, None, 8, 8),      # a laptop or a node of its own: every core it may run on
        (1000, None, 8, 1),      # limit (or request) of one CPU on an 8-core node
        (2500, None, 8, 2),      # a fraction rounds down: a quota is not exceeded
        (500, None, 8, 1),       # at least one thread
        (16000, None, 4, 4),     # a limit above the cores the process may run on
        (None, 3.0, 8, 3),       # cgroup v2 quota
        (4000, 2.0, 8, 2),       # the tightest bound wins
        (0, None, 2, 2),         # "0" (no value) is not a budget
    ],
)
def test_torch_threads_follow_the_pods_cpu_budget(declared_millicores, quota, usable, threads):
    assert decide_cpu_threads(declared_millicores, quota, usable) == threads


@pytest.mark.parametrize(("cpu_max", "cpus"), [("max 100000", None), ("200000 100000", 2.0),
                                               ("150000 100000", 1.5), ("garbage", None), ("", None)])
def test_cgroup_cpu_max_is_read_as_cpus(cpu_max, cpus):
    assert cgroup_quota_cpus(cpu_max) == cpus


def test_a_declared_cpu_budget_bounds_the_threads_and_junk_is_ignored():
    assert cpu_threads({"POLLINATE_CPU_MILLICORES": "1000"}) == 1
    assert cpu_threads({"POLLINATE_CPU_MILLICORES": "two"}) >= 1
