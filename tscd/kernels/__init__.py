"""Fused ops of tscd. Each has one public function with ``backend="auto"|"cuda"|"triton"|"cpp"|"torch"``
and a pure-PyTorch reference in ``tscd.kernels.reference`` that defines the truth.

| op       | what (section of docs/method.md)                       | backends                  |
|----------|--------------------------------------------------------|---------------------------|
| refine   | VARM / PAR refinement of class maps (4.1)              | cuda, triton, cpp, torch  |
| correlation_loss | SCD loss, streamed tiles, random / dense / given points (4.2) | cuda, triton, cpp, torch |
| permutohedral_filter | Gaussian filter on a permutohedral lattice (4.5, 6) | cuda, cpp, torch (exact) |
| dense_energy_loss | CRF energy ("reg") loss on that filter (4.5) | cuda, cpp, torch (exact) |
| dense_crf | mean-field dense-CRF inference (6)                     | cuda, cpp, torch (exact)  |

``auto``: cuda (else triton) for CUDA tensors, cpp for CPU tensors, torch as the last resort; the
environment variable ``TSCD_BACKEND`` sets a process-wide preference. ``tscd info`` lists what runs here.
"""
from tscd.kernels._backend import BACKENDS, available_backends, resolve_backend
from tscd.kernels.correlation import correlation_loss
from tscd.kernels.permutohedral import dense_crf, dense_energy_loss, permutohedral_filter
from tscd.kernels.refine import refine, refine_weights

__all__ = ["BACKENDS", "available_backends", "correlation_loss", "dense_crf", "dense_energy_loss",
           "permutohedral_filter", "refine", "refine_weights", "resolve_backend"]
