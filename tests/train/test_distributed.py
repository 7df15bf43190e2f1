"""The process group's life: a run leaves the group it joined (gloo and nccl threads left to the interpreter's
finalisation can abort the process after the work is done), and leaves alone a group its caller made."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.train.test_fidelity import make
from tscd.train import trainer as trainer_mod
from tscd.train.distributed import DistInfo, close_distributed, init_distributed

_INIT = dist.init_process_group


def _one_process_group(tmp_path):
    _INIT("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


def test_init_distributed_owns_the_group_it_joins_and_close_leaves_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; the group itself is a one-process stand-in
    monkeypatch.setattr(dist, "init_process_group", lambda backend: _one_process_group(tmp_path))
    try:
        info, device = init_distributed("cpu")
        assert (info.world_size, info.owns_group, device.type) == (2, True, "cpu") and dist.is_initialized()
        close_distributed(info)
        assert not dist.is_initialized() and not info.owns_group
        close_distributed(info)  # twice: nothing happens
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_group_the_caller_made_is_left_alone(tmp_path, monkeypatch):
    _one_process_group(tmp_path)
    try:
        monkeypatch.setenv("WORLD_SIZE", "1")
        info, _ = init_distributed("cpu")
        assert not info.owns_group
        close_distributed(info)
        close_distributed(DistInfo())
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_trainer_close_leaves_the_group_it_joined(tmp_path, monkeypatch):
    def joined(pref):
        _one_process_group(tmp_path)
        return DistInfo(owns_group=True), torch.device("cpu")

    monkeypatch.setattr(trainer_mod, "init_distributed", joined)
    try:
        tr = make(tmp_path)
        assert dist.is_initialized()
        tr.close()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_run_leaves_the_group_when_it_succeeds_only(tmp_path, monkeypatch):
    """`tscd train` leaves the group after a run that finished; a failing one stays (a peer may be inside a
    collective, where leaving could block) and torchrun stops the others."""
    from tests._utils import write_tiny_config
    from tscd.cli import main

    def joined(pref):
        _one_process_group(tmp_path / "g")
        return DistInfo(owns_group=True), torch.device("cpu")

    (tmp_path / "g").mkdir()
    monkeypatch.setattr(trainer_mod, "init_distributed", joined)
    cfg = write_tiny_config(tmp_path / "tiny.yaml")
    def fails(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer_mod.Trainer, "train", fails)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "fail")])
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    monkeypatch.setattr(trainer_mod.Trainer, "train", lambda self: {k: {"miou": 0.0} for k in ("seg", "cam", "pseudo")})
    assert main(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "ok")]) == 0
    assert not dist.is_initialized()
