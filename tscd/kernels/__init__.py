"""Fused ops of tscd. Each has one public function with ``backend="auto"|"cuda"|"triton"|"cpp"|"torch"``
and a pure-PyTorch reference in ``tscd.kernels.reference`` that defines the truth.

| op       | what                                                   | backends                  |
|----------|--------------------------------------------------------|---------------------------|
| refine   | VARM / PAR refinement of class maps (SPEC.md 4.1)      | cuda, triton, cpp, torch  |
| correlation_loss | SCD loss, streamed tiles, random / dense / given points (SPEC.md 4.2) | cuda, triton, cpp, torch |

``auto``: cuda (else triton) for CUDA tensors, cpp for CPU tensors, torch as the last resort; the
environment variable ``TSCD_BACKEND`` sets a process-wide preference. ``tscd info`` lists what runs here.
"""
from tscd.kernels._backend import BACKENDS, available_backends, resolve_backend
from tscd.kernels.correlation import correlation_loss
from tscd.kernels.refine import refine, refine_weights

__all__ = ["BACKENDS", "available_backends", "correlation_loss", "refine", "refine_weights", "resolve_backend"]
