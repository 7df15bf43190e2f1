"""``train.host_memory: reuse``: glibc keeps freed memory, so a large tensor allocated again reuses its pages instead
of faulting fresh ones in (the cost tscd.train.host_memory describes); measured by the process's minor page faults,
in child processes (the setting is process-wide and permanent)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tscd.train.host_memory import _glibc

CHILD = r"""
import json, resource, sys, torch
from tscd.train.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "reuse" else False
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(64 * 2**20 // 4)  # 64 MiB: above glibc's largest mmap threshold
    x.fill_(1.0)
    s = float(x[::4096].sum())
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, s
faults_of_one_round()
print(json.dumps({"applied": applied, "faults": [faults_of_one_round()[0] for _ in range(7)]}))
"""

needs_glibc = pytest.mark.skipif(_glibc() is None, reason="glibc only (the setting is a no-op elsewhere)")


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_reuse_stops_the_page_faults_of_large_tensors():
    pages = 64 * 2**20 // 4096
    system, reuse = _faults("system"), _faults("reuse")
    assert not system["applied"] and reuse["applied"]
    assert min(system["faults"]) > pages // 2  # fresh pages every time (mmap / munmap)
    # the freed block is served again; now and then the heap grows instead (what else was allocated in between
    # took part of the hole), so most rounds, not all, are free of faults
    assert sorted(reuse["faults"])[3] < pages // 20, reuse["faults"]
    assert sum(reuse["faults"]) < 3 * pages, reuse["faults"]


def test_trainer_applies_it_on_the_cpu_only_when_asked(tmp_path, monkeypatch):
    from tests._utils import tiny_overrides
    from tscd.config import load_config
    from tscd.train import Trainer, host_memory

    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    Trainer(load_config(None, [*tiny_overrides(tmp_path / "a"), "train.device=cpu"]), resume="never")
    assert calls == [1]
    Trainer(load_config(None, [*tiny_overrides(tmp_path / "b"), "train.device=cpu", "train.host_memory=system"]),
            resume="never")
    assert calls == [1]
    with pytest.raises(ValueError, match="host_memory"):
        load_config(None, [*tiny_overrides(tmp_path / "c"), "train.host_memory=keep"])


@pytest.mark.parametrize("device,mode,applied", [("cpu", "reuse", True), ("cpu", "system", False),
                                                 ("cuda", "reuse", False)])
def test_eval_commands_follow_the_checkpoint_config(monkeypatch, device, mode, applied):
    """tscd eval / infer / pseudo-labels load their model through load_checkpoint_model, which applies the config's
    train.host_memory (an override on the command line included) on the CPU."""
    import argparse
    import types

    import torch

    from tscd.commands._common import load_checkpoint_model
    from tscd.config import load_config
    from tscd.eval import inference
    from tscd.train import host_memory

    cfg = load_config(None, ["data.dataset=demo", f"train.host_memory={mode}"])
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(inference, "resolve_device", lambda pref: torch.device(device))
    monkeypatch.setattr(inference, "load_model", lambda path, dev, overrides: types.SimpleNamespace(config=cfg))
    args = argparse.Namespace(device=device, checkpoint="ckpt.pt", overrides=[])
    dev, loaded = load_checkpoint_model(args)
    assert (dev.type, loaded.config.train.host_memory, calls) == (device, mode, [1] if applied else [])
