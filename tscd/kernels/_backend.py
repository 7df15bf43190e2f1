"""Which backend runs an op: the one place that decides.

Backends:
    ``torch``  the pure-PyTorch reference (any device, any float dtype, full autograd);
    ``cpp``    the C++ kernels of ``tscd._C`` on CPU tensors (OpenMP);
    ``cuda``   the CUDA kernels of ``tscd._C`` on CUDA tensors;
    ``triton`` Triton kernels on CUDA tensors (on CPU tensors only under ``TRITON_INTERPRET=1``).

``auto`` picks, for CUDA tensors: cuda, else triton; for CPU tensors: cpp; torch as the last
resort. A process-wide preference may be given with the environment variable ``TSCD_BACKEND``
(used by ``auto`` when that backend can run the op on the device; ignored with a warning otherwise).
Asking for a backend by name that cannot run raises ``RuntimeError`` saying why.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

from tscd.kernels import _ext

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "triton", "cuda", "cpp", "torch")
ALL_KERNEL_BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "torch")


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_ERROR: list[str | None] = []  # filled on first use (importing triton takes a moment)


def triton_import_error() -> str | None:
    """None when triton imports, else why not."""
    if not _TRITON_ERROR:
        err = None
        if importlib.util.find_spec("triton") is None:
            err = "the `triton` package is not installed (pip install triton)"
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception as exc:  # pragma: no cover - depends on the install
                err = f"importing triton failed: {exc}"
        _TRITON_ERROR.append(err)
    return _TRITON_ERROR[0]


def why_unavailable(backend: str, device: torch.device, op: str) -> str | None:
    """None if ``backend`` can run ``op`` on ``device``, else the reason in words."""
    dev = device.type
    if backend == "torch":
        return None
    if backend == "cpp":
        if dev != "cpu":
            return f"the cpp backend runs on CPU tensors, but the inputs are on {device} (use backend='cuda' or 'auto')"
        err = _ext.load_error()
        return None if err is None else f"the extension tscd._C is not available ({err}); {_ext.BUILD_HELP}"
    if backend == "cuda":
        if dev != "cuda":
            return (f"the cuda backend runs on CUDA tensors, but the inputs are on {device} "
                    "(use backend='cpp' or 'auto')")
        err = _ext.load_error()
        if err is not None:
            return f"the extension tscd._C is not available ({err}); {_ext.BUILD_HELP}"
        if not _ext.has_cuda_kernels(op):
            return ("tscd._C was built without CUDA kernels (no nvcc found, or TSCD_BUILD_CUDA=0 at build time); "
                    + _ext.BUILD_HELP)
        return None
    if backend == "triton":
        err = triton_import_error()
        if err is not None:
            return err
        if dev == "cuda":
            return None
        if dev == "cpu" and triton_interpret():
            return None
        return (f"the triton backend needs CUDA tensors (inputs are on {device}); on the CPU it runs only in the "
                "interpreter: set TRITON_INTERPRET=1 before importing tscd")
    return f"unknown backend {backend!r}; choose one of {BACKENDS}"


def resolve_backend(op: str, backend: str | None, device: torch.device, supported: tuple[str, ...]) -> str:
    """Turn ``backend`` (a name or ``auto``) into the concrete backend that runs ``op`` on ``device``.

    Args:
        op: the op's name, used in messages and to probe the extension (e.g. ``"refine_fwd"``).
        backend: ``"auto"``, ``None`` (same as auto) or one of ``triton|cuda|cpp|torch``.
        device: the device of the op's inputs.
        supported: the backends this op implements.

    Raises:
        ValueError: ``backend`` is not a known name.
        RuntimeError: the requested backend cannot run here; the message says why and how to fix it.
    """
    name = op.split("_")[0]
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{name}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        if backend not in supported:
            raise RuntimeError(f"{name}: backend {backend!r} is not implemented for this op; "
                               f"available: {', '.join(supported)}")
        why = why_unavailable(backend, device, op)
        if why is not None:
            raise RuntimeError(f"{name}: backend {backend!r} cannot run: {why}")
        return backend
    preferred = os.environ.get("TSCD_BACKEND", "auto").strip() or "auto"
    if preferred != "auto":
        if preferred in supported and why_unavailable(preferred, device, op) is None:
            return preferred
        _warn_once(f"TSCD_BACKEND={preferred} cannot run {name} on {device.type}; using the automatic choice")
    order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    for candidate in order:
        if candidate in supported and why_unavailable(candidate, device, op) is None:
            return candidate
    return "torch"


def available_backends(op: str, device: torch.device, supported: tuple[str, ...]) -> list[str]:
    """The backends among ``supported`` that can run ``op`` on ``device`` right now."""
    return [b for b in supported if why_unavailable(b, device, op) is None]


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)
