"""The C library's allocator on the CPU: keep freed memory for reuse (``train.host_memory: reuse``).

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold (at most 32 MiB) with
a fresh ``mmap`` and gives it back to the kernel when it is freed, so each large activation of each iteration
starts as untouched pages: the kernel zero-fills them on first write, page by page. On some machines (virtual
machines under memory pressure in particular) that costs as much as the arithmetic: a 300 MiB copy took 172 ms
on fresh pages and 28 ms on reused ones on the 2-core EPYC VM of bench/results, and a whole TSCD iteration at crop
512 went from 50 s to 20 s (bench/results/cpu-2t/host_memory.md).

:func:`keep_freed_memory` tells glibc to serve large blocks from its heap as well (``M_MMAP_MAX = 0``) and never to
return the heap's free top to the kernel (``M_TRIM_THRESHOLD`` = the largest size): after the first iteration, the
same pages are reused. The numbers a run computes do not change (only where the bytes live); the process keeps its
high-water mark of memory (its resident size does not shrink after a peak), which a training process reaches every
iteration anyway. Other C libraries (macOS, musl) are left alone. The setting is process-wide and inherited by
forked data-loader workers.
"""
from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: The modes of ``train.host_memory``.
HOST_MEMORY_MODES = ("reuse", "system")

_applied = False


def _glibc():
    """glibc's handle, or None where the C library is another one."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has no such function)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory in this process (module docstring); idempotent.

    Returns:
        True when the setting is in effect (now or from an earlier call), False where the C library is not glibc
        or refused it (then nothing changed).
    """
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1 converts to SIZE_MAX in glibc's do_set_trim_threshold(size_t): never trim the heap's top
    if libc.mallopt(M_TRIM_THRESHOLD, -1) != 1 or libc.mallopt(M_MMAP_MAX, 0) != 1:
        log.warning("host memory: glibc refused mallopt(); freed memory is returned to the system as usual")
        return False
    _applied = True
    log.info("host memory: glibc keeps freed memory for reuse (train.host_memory: reuse)")
    return True


def apply_host_memory(mode: str, device) -> bool:
    """``train.host_memory`` for a process working on ``device``: :func:`keep_freed_memory` when ``mode`` is
    ``"reuse"`` and the device is the CPU (the CUDA allocator caches on its own); returns whether it is in effect."""
    if mode == "reuse" and getattr(device, "type", device) == "cpu":
        return keep_freed_memory()
    return False


def host_memory_mode() -> str:
    """``"reuse"`` when :func:`keep_freed_memory` is in effect in this process, else ``"system"``."""
    return "reuse" if _applied else "system"
