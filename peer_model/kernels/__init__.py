"""Triton kernels for CUDA, each tested on CPU under TRITON_INTERPRET=1.

One kernel family per file, wrapped in an ``autograd.Function``, with the plain PyTorch version it must
equal beside it (``expert_mix.py``: PEER's expert mix, against ``peer_model.experts``).

This package imports without triton; ``triton_available`` says whether its kernels can run on a device.
The kernels are built (``triton.jit``) when their module is first imported, and TRITON_INTERPRET is read
then: set it before that import to run them on CPU.
"""
from __future__ import annotations

import importlib.util

import torch


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on ``device``: triton imports and the device is CUDA, or
    the device is the CPU and the kernels were built for the interpreter (TRITON_INTERPRET=1 was set
    when ``peer_model.kernels.expert_mix`` was first imported, which this call may do)."""
    device = torch.device(device)
    if device.type not in ("cuda", "cpu") or importlib.util.find_spec("triton") is None:
        return False
    from . import expert_mix  # builds the kernels, for the interpreter or not, once

    if device.type == "cuda":
        return torch.cuda.is_available() and not expert_mix.INTERPRETED
    return expert_mix.INTERPRETED
