"""Process set-up of a run: one process, or several under torchrun (which sets RANK / WORLD_SIZE / LOCAL_RANK)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tscd.config import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # init_distributed joined the process group: close_distributed leaves it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """This process's rank and device (``train.device``: auto, cpu, cuda or cuda:N); joins the process group
    (nccl on GPUs, gloo on CPUs) when there are several processes.

    Raises:
        ConfigError: a CUDA device is asked for but none is visible.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"config: train.device={device_pref!r} but no CUDA GPU is visible here; use "
                          f"train.device=cpu (or auto)")
    if use_cuda:
        index = info.local_rank if world > 1 or ":" not in device_pref else int(device_pref.split(":")[1])
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        info.owns_group = True
    return info, device


def close_distributed(info: DistInfo) -> None:
    """Leave the process group that :func:`init_distributed` joined (nothing otherwise; safe to call twice).

    A process that exits still in the group has its gloo or nccl threads torn down by the interpreter's
    finalisation, which can abort it ("terminate called without an active exception", SIGABRT) after the
    work is done: torchrun then reports the run failed. Called at the end of a run that succeeded; a failing
    run does not call it (a peer may be inside a collective, and leaving could block: torchrun stops the
    others when one process fails).
    """
    if info.owns_group and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    info.owns_group = False
