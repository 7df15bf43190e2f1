"""Loads the compiled extension ``tscd._C`` once and says what it provides.

The extension registers its ops (``torch.ops.tscd.*``) with PyTorch's dispatcher when imported:
CPU kernels always, CUDA kernels when it was compiled with CUDA. A missing or broken extension is
not an error here: only asking for the ``cpp`` or ``cuda`` backend by name is (see ``_backend``).
"""
from __future__ import annotations

import torch

BUILD_HELP = (
    "build it with `pip install -e .` from the repository root "
    "(README.md, 'Install'); `tscd info` shows what is built"
)
# The instruction sets of the CPU kernels, by torch.ops.tscd.cpu_isa_level(); TSCD_CPU_ISA takes these names.
CPU_ISA_NAMES = {0: "baseline", 1: "avx2", 2: "avx512"}


def _import_extension() -> str | None:
    try:
        from tscd import _C  # noqa: F401  (importing registers torch.ops.tscd.*)
    except ImportError as err:  # not built, or built against another torch
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "undefined symbol" in msg or "version" in msg.lower():
            msg += " (the extension was built for another torch; rebuild it)"
        return msg
    return None


_LOAD_ERROR: str | None = _import_extension()  # once, at import: later calls read a constant


def load_error() -> str | None:
    """None when ``tscd._C`` imported, else why it failed (one line)."""
    return _LOAD_ERROR


def has_cpp() -> bool:
    """True when the extension imported (its CPU kernels are always compiled in)."""
    return load_error() is None


def has_cuda_kernels(op: str = "refine_fwd") -> bool:
    """True when the extension was compiled with CUDA kernels for ``tscd::<op>`` (a GPU is not needed)."""
    if not has_cpp():
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"tscd::{op}", "CUDA"))


def build_report() -> dict | None:
    """What setup.py recorded when it compiled tscd._C (kernels, CUDA archs, torch, log), or None.

    It lies beside the extension as ``tscd/_build_info.json`` (written by setup.py's build_ext).
    """
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cpu_isa() -> str:
    """The instruction set the CPU kernels run: the widest this CPU supports, capped by the environment variable
    TSCD_CPU_ISA (or its older name TSCD_CORRELATION_ISA); the error's first line for a bad cap."""
    try:
        return CPU_ISA_NAMES[int(torch.ops.tscd.cpu_isa_level())]
    except RuntimeError as err:
        return f"error: {str(err).splitlines()[0]}"


def build_info() -> dict:
    """What the extension says about its own build (empty when not built)."""
    if not has_cpp():
        return {}
    return {
        "openmp_threads": int(torch.ops.tscd.openmp_max_threads()),
        "cpu_isa": cpu_isa(),
        "cpu_isa_supported": CPU_ISA_NAMES[int(torch.ops.tscd.cpu_isa_supported())],
        "cuda_kernels": has_cuda_kernels(),
    }
