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
