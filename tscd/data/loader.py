"""DataLoader construction with reproducible, per-sample augmentation randomness.

How seeding works:

* The sampler is wrapped in :class:`EpochSampler`, which yields ``(index, epoch, seed)`` keys instead
  of indices. A dataset turns the key into ``numpy.random.default_rng([seed, epoch, index])``, so an
  item's augmentation depends only on (seed, epoch, index): not on the worker that loads it, nor on
  the number of workers. (The reference code seeded numpy once per process, so every worker repeated
  the same draws; ours cannot.)
* The epoch counts the passes over the loader (0, 1, 2, ...); ``loader.sampler.set_epoch(e)`` sets
  it explicitly (e.g. when resuming). It is forwarded to a ``DistributedSampler``, whose shuffle
  then changes every epoch even if the caller forgets to call ``set_epoch``.
* Shuffling uses a ``torch.Generator`` seeded with ``seed``; :func:`seed_worker` additionally seeds
  ``random``, ``numpy`` and ``torch`` in each worker from PyTorch's per-worker seed, so any other
  random code in a worker does not repeat across workers either.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random``, ``numpy`` and ``torch`` from this worker's torch seed.

    ``torch.initial_seed()`` in a worker is PyTorch's base seed (drawn from the loader's generator
    once per epoch) plus the worker id, so the seeds differ across workers and epochs and are
    reproducible for a given loader seed.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSampler(Sampler):
    """Wraps a sampler; yields ``(index, epoch, seed)`` so that datasets seed each item on its own.

    Args:
        sampler: any sampler of indices (Random/Sequential/DistributedSampler, ...).
        seed: base seed of the augmentations.
    """

    def __init__(self, sampler: Sampler, seed: int = 0) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass (and forward it to a sampler that has ``set_epoch``)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        # Not a generator function: the epoch is taken (and advanced) when the pass starts, not at
        # its first item, so a set_epoch() between iter() and next() cannot shift it.
        epoch = self.epoch
        self.epoch += 1  # the next pass gets the next epoch unless set_epoch is called
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        seed = self.seed
        return ((int(index), epoch, seed) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class ResumableLoader:
    """A training loader whose position is part of a checkpoint: the epoch, the batches taken in it and the states
    of the shuffle generators when it began. Iterating yields batches forever (epoch after epoch); after
    :meth:`load_state_dict` the interrupted epoch is replayed in its order, minus the batches already used.

    Args:
        base: a shuffling loader from :func:`build_loader` (its dataset, sampler, generator and workers are used).
    """

    def __init__(self, base: DataLoader) -> None:
        self.sampler = SkippingSampler(base.sampler)
        self.loader = DataLoader(base.dataset, batch_size=base.batch_size, sampler=self.sampler,
                                 num_workers=base.num_workers, drop_last=base.drop_last, pin_memory=base.pin_memory,
                                 worker_init_fn=base.worker_init_fn, generator=base.generator)
        self.epoch = 0
        self.batches_in_epoch = 0
        self.epoch_gen_states: list | None = None  #: the generators' states as the current epoch began

    def __len__(self) -> int:
        return len(self.loader)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "epoch_gen_states": self.epoch_gen_states}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        self.epoch_gen_states = state["epoch_gen_states"]

    def _generators(self) -> list[torch.Generator]:
        inner = getattr(self.sampler.inner, "sampler", None)
        return [g for g in (getattr(inner, "generator", None), self.loader.generator) if g is not None]

    def __iter__(self):
        resumed = self.epoch_gen_states is not None
        if resumed:  # replay the interrupted epoch's order, minus the batches already used
            for g, st in zip(self._generators(), self.epoch_gen_states):
                g.set_state(st)
            self.sampler.skip = self.batches_in_epoch * self.loader.batch_size
        while True:
            if not resumed:
                self.epoch_gen_states = [g.get_state() for g in self._generators()]
            resumed = False
            self.sampler.set_epoch(self.epoch)
            for batch in self.loader:
                self.batches_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batches_in_epoch = 0


class SkippingSampler(Sampler):
    """Wraps a loader's :class:`EpochSampler`; the first pass after ``skip`` is set starts ``skip`` items in (a
    resumed run replays its interrupted epoch without the batches it already used)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        keys = list(iter(self.inner))
        skip, self.skip = self.skip, 0
        return iter(keys[skip:])

    def __len__(self) -> int:
        return len(self.inner)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                 drop_last: bool = False, distributed: bool = False, pin_memory: bool | None = None) -> DataLoader:
    """A DataLoader with per-sample seeding (module docstring) and an optional DistributedSampler.

    The dataset must accept ``(index, epoch, seed)`` keys (every dataset of ``tscd.data`` does).
    Evaluation items have native sizes: use ``batch_size=1`` for them.

    Args:
        dataset: a ``tscd.data`` dataset.
        batch_size: items per batch (per process when distributed).
        shuffle: shuffle every epoch (a fresh, seeded order per epoch).
        num_workers: loader processes (0: load in the main process; results are identical).
        seed: base seed of shuffling and augmentation.
        drop_last: drop the last incomplete batch.
        distributed: shard with ``DistributedSampler`` (needs an initialised process group).
        pin_memory: default: True when CUDA is available.

    Returns:
        The DataLoader; ``loader.sampler`` is an :class:`EpochSampler` (has ``set_epoch``).
    """
    if batch_size < 1:
        raise ValueError(f"build_loader: `batch_size` must be >= 1; got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"build_loader: `num_workers` must be >= 0; got {num_workers}")
    if distributed:
        inner: Sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    elif shuffle:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
        inner = RandomSampler(dataset, generator=generator)
    else:
        inner = SequentialSampler(dataset)
    loader_generator = torch.Generator()
    loader_generator.manual_seed(int(seed) + 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(inner, seed),
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=loader_generator,
        persistent_workers=False,
    )
