"""Launch helpers shared by the Triton launchers."""
from __future__ import annotations

import contextlib

import torch


def device_guard(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current device while a Triton kernel launches.

    Triton compiles for, and launches on the stream of, the *current* CUDA device, not the device of the
    arguments: tensors on cuda:1 while cuda:0 is current would run on the wrong GPU (an illegal memory access).
    On CPU tensors (the interpreter) this is a no-op.
    """
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
