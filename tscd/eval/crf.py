"""Dense-CRF post-processing of segmentation probabilities (docs/method.md 6), run in parallel.

The CRF itself is :func:`tscd.kernels.dense_crf` (our permutohedral lattice; pydensecrf's DenseCRF2D model), imported
lazily so that everything else works without it. Settings are the field's: 10 mean-field iterations, Gaussian kernel
sxy 3 / compat 3, bilateral kernel sxy 64 / srgb 5 / compat 4, on the 0..255 image.

:class:`CRFRunner` runs CUDA jobs synchronously on the device (the op is already parallel there) and CPU jobs in a
thread pool (the op releases the GIL), with a bounded number of jobs in flight; results are handed to callbacks in
submission order, on the caller's thread.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from tscd.errors import UnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings (defaults: the values behind the field's reported numbers)."""

    num_iter: int = 10
    gauss_sxy: float = 3
    gauss_compat: float = 3
    bilateral_sxy: float = 64
    bilateral_srgb: float = 5
    bilateral_compat: float = 4


def get_dense_crf() -> Callable[..., Tensor]:
    """Return :func:`tscd.kernels.dense_crf`.

    Raises:
        RuntimeError: it is not available in this installation (names what is missing).
    """
    try:
        from tscd.kernels import dense_crf
    except ImportError as err:
        raise UnavailableError(f"CRF post-processing (--crf) needs tscd.kernels.dense_crf (the permutohedral "
                               f"dense CRF, docs/method.md 6), which this tscd installation does not provide "
                               f"({err}); update tscd, or run without --crf") from None
    return dense_crf


def crf_refine(image: Tensor, probs: Tensor, params: CRFParams = CRFParams(), backend: str = "auto") -> Tensor:
    """Refine softmax probabilities with the dense CRF.

    Args:
        image: (B, 3, H, W) or (3, H, W) on the 0..255 scale (float or uint8), same device as ``probs``.
        probs: (B, K, H, W) float softmax probabilities.
        params: CRF settings.
        backend: kernel backend of ``dense_crf``.

    Returns:
        (B, K, H, W) refined probabilities.

    Raises:
        RuntimeError: ``dense_crf`` is missing.
    """
    dense_crf = get_dense_crf()
    return dense_crf(image, probs, backend=backend, **asdict(params))


class CRFRunner:
    """Runs CRF jobs (on CUDA inline, on CPU in ``workers`` threads) and calls ``callback(refined_probs)`` per job.

    Args:
        params: CRF settings.
        workers: threads for CPU jobs (>= 1); 0 runs CPU jobs inline too.
        backend: kernel backend passed to ``dense_crf``.
        max_pending: most jobs in flight before :meth:`submit` waits for the oldest (bounds memory).

    Raises:
        RuntimeError: ``dense_crf`` is missing (checked at construction, before any work is done).
    """

    def __init__(self, params: CRFParams = CRFParams(), workers: int = 2, backend: str = "auto",
                 max_pending: int | None = None) -> None:
        self.fn = get_dense_crf()
        self.params, self.backend = params, backend
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="crf") if workers > 0 else None
        self.max_pending = max_pending or 2 * max(1, workers)
        self.pending: deque[tuple[Future, Callable[[Tensor], None]]] = deque()

    def _run(self, image: Tensor, probs: Tensor) -> Tensor:
        with torch.no_grad():
            return self.fn(image, probs, backend=self.backend, **asdict(self.params))

    def submit(self, image: Tensor, probs: Tensor, callback: Callable[[Tensor], None]) -> None:
        """Queue one job: ``image`` (B, 3, H, W) 0..255, ``probs`` (B, K, H, W); ``callback`` gets the result."""
        if self.pool is None or probs.is_cuda:
            self.poll(block=True)  # keep callbacks in submission order
            callback(self._run(image, probs))
            return
        self.pending.append((self.pool.submit(self._run, image, probs), callback))
        while len(self.pending) >= self.max_pending:
            self._finish_oldest()
        self.poll()

    def _finish_oldest(self) -> None:
        future, callback = self.pending.popleft()
        callback(future.result())

    def poll(self, block: bool = False) -> None:
        """Deliver finished results in order (all of them, waiting, when ``block``)."""
        while self.pending and (block or self.pending[0][0].done()):
            self._finish_oldest()

    def close(self) -> None:
        """Wait for every job, deliver the results, stop the threads."""
        try:
            self.poll(block=True)
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
