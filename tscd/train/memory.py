"""Memory of a training run: peak-memory measurement and the dry run (and what the low-memory mode does).

Low-memory mode (``train.memory: low``, e.g. ``configs/voc_lowmem.yaml``) is one switch that
:func:`tscd.config.resolve_config` turns into:

* ``train.amp: bf16``: bf16 autocast for the trained forward passes and the no-grad CAM passes (the losses and
  the fused ops get fp32 inputs: the trainer casts the logits and CAMs with ``.float()`` at the op boundary);
* ``train.checkpointing: all``: activation checkpointing of the MiT blocks, the decoder and the affinity head
  (both views; see :mod:`tscd.models.tscd_net`);
* ``train.accum_steps``: micro-batches of one image with gradient accumulation, so the global batch (and the
  gradient, up to what accumulation cannot reproduce: BatchNorm statistics and batch-wide means) stays the same.

It overrides those keys (a log line each, and the run's ``config.yaml`` holds the values that ran); set them one by
one with ``train.memory: default`` for anything in between. On the CPU bf16 is often slower than fp32 (no bf16
matrix units on many CPUs); it still halves the activations.

Peak memory (:class:`PeakMemory`): on CUDA ``torch.cuda.max_memory_allocated``; on the CPU, which keeps no
allocator statistics, the allocation events of torch's CPU allocator recorded by the profiler
(``profile_memory=True``) are replayed and the highest sum of live bytes is taken: tensor bytes, not RSS, the
same method as ``bench/``. Both count tensors only (no CUDA context, no allocator caching).

Dry run (``tscd train --config ... --dry-run``, :func:`dry_run`): a few post-warm-up iterations (all losses on)
of the given configuration on its device; prints seconds per iteration and peak memory and writes nothing.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Iterable

import torch

from tscd.config import Config, fit_max_iters

logger = logging.getLogger(__name__)

MIB = 2 ** 20


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

class PeakMemory:
    """Context manager: the peak of torch's tensor memory on ``device`` while it is open.

    After the block: ``peak_bytes`` is the peak above what was live on entry (CUDA and CPU) and ``net_bytes``
    what the block left allocated (live on exit minus on entry); on CUDA also ``max_allocated_bytes``
    (``torch.cuda.max_memory_allocated``: everything live at the peak, entry state included).

    On the CPU the torch profiler records every allocation (slower: use it for one iteration, not for timing).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.net_bytes = 0
        self.max_allocated_bytes: int | None = None
        self._prof = None
        self._base = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.max_allocated_bytes = int(torch.cuda.max_memory_allocated(self.device))
            self.peak_bytes = self.max_allocated_bytes - self._base
            self.net_bytes = int(torch.cuda.memory_allocated(self.device)) - self._base
            return
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        events = [e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            if e.device_type() != torch.autograd.DeviceType.CPU:
                continue
            live += e.nbytes()
            peak = max(peak, live)
        self.peak_bytes, self.net_bytes = int(peak), int(live)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes held between iterations: parameters + buffers, gradients, optimizer state."""
    opt_tensors = []
    if optimizer is not None:
        for st in optimizer.state.values():
            opt_tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return {
        "weights": tensor_bytes(list(model.parameters()) + list(model.buffers())),
        "grads": tensor_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": tensor_bytes(opt_tensors),
    }


# ----------------------------------------------------------------------------------------------
# Dry run
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DryRunResult:
    """What :func:`dry_run` measured."""

    device: str
    iterations: int
    seconds: list[float]  #: wall time of each iteration (the CPU's profiled last iteration excluded)
    peak_bytes: int  #: peak tensor memory of one iteration, everything included (weights, optimizer state)
    state_bytes: dict[str, int]  #: weights / grads / optimizer bytes at the start of the measured iteration
    losses: dict[str, float]  #: loss terms of the last iteration

    @property
    def seconds_per_iteration(self) -> float:
        """Median time after the first iteration (which includes one-off start-up work), or the first."""
        rest = self.seconds[1:] or self.seconds
        return statistics.median(rest)

    def summary(self) -> str:
        state = sum(self.state_bytes.values())
        lines = [
            f"dry run on {self.device}: {self.iterations} iterations, all losses on (warm-up skipped)",
            f"  seconds / iteration: {self.seconds_per_iteration:.3f} (each: "
            + ", ".join(f"{s:.3f}" for s in self.seconds) + ")",
            f"  peak memory: {self.peak_bytes / MIB:.0f} MiB ({state / MIB:.0f} MiB weights, gradients and "
            f"optimizer state + {(self.peak_bytes - state) / MIB:.0f} MiB during the iteration; "
            + ("torch.cuda.max_memory_allocated" if self.device.startswith("cuda")
               else "CPU allocator, tensor bytes") + ")",
            "  losses: " + " ".join(f"{k}={v:.4f}" for k, v in self.losses.items()),
            "nothing was written (no checkpoint, no run directory)",
        ]
        return "\n".join(lines)


def dry_run_config(cfg: Config, iterations: int, run_dir: str, max_iters: int | None = None) -> Config:
    """``cfg`` for a dry run: warm-up off (all losses from iteration 1), no TensorBoard, a scratch run dir."""
    out = copy.deepcopy(cfg)
    if max_iters is not None:
        fit_max_iters(out, max_iters)
    out.train.cam_iters = 0
    out.train.max_iters = max(out.train.max_iters, iterations)
    out.train.tensorboard = False
    out.train.run_dir = run_dir
    return out


def dry_run(cfg: Config, iterations: int = 3, max_iters: int | None = None) -> DryRunResult:
    """Run ``iterations`` post-warm-up training iterations of ``cfg`` on its device and measure them.

    CUDA: every iteration is timed; the peak is ``max_memory_allocated`` over all of them. CPU: the profiler
    that measures the peak slows the iteration down, so iterations 1 .. n-1 are timed and the last one is
    measured (n >= 2). Nothing is written: the trainer runs in a temporary directory, deleted afterwards.

    Args:
        cfg: the configuration as loaded (the trainer resolves it).
        iterations: how many iterations (>= 2).
        max_iters: ``--max-iters`` of the command line (it only matters for the learning-rate schedule).

    Raises:
        ValueError: ``iterations`` < 2.
    """
    if iterations < 2:
        raise ValueError(f"dry_run: `iterations` must be >= 2; got {iterations}")
    from tscd.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="tscd-dry-run-") as tmp:
        trainer = Trainer(dry_run_config(cfg, iterations, tmp, max_iters), resume="never")
        try:
            device = trainer.device
            batches = trainer._batches()
            seconds: list[float] = []
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            state = None
            losses: dict[str, float] = {}
            peak = 0
            for i in range(iterations):
                batch = next(batches)
                trainer.iteration += 1
                measured = not cuda and i == iterations - 1
                if measured:
                    state = state_bytes(trainer.trained_modules(), trainer.optimizer)
                    with PeakMemory(device) as pm:
                        losses = trainer.train_step(batch)
                    peak = sum(state.values()) + pm.peak_bytes
                    continue
                t0 = time.perf_counter()
                losses = trainer.train_step(batch)
                if cuda:
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - t0)
            if cuda:
                state = state_bytes(trainer.trained_modules(), trainer.optimizer)
                peak = int(torch.cuda.max_memory_allocated(device))
        finally:
            trainer.close()
    return DryRunResult(str(device), iterations, seconds, int(peak), state, losses)
