"""Low-memory mode, peak-memory measurement, leftover tensors after train_step, and `tscd train --dry-run`."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests._utils import write_tiny_config
from tscd.cli import main
from tscd.config import ConfigError, load_config, resolve_config
from tscd.train.memory import PeakMemory, dry_run, state_bytes, tensor_bytes


@pytest.fixture()
def tiny_cfg(tmp_path: Path) -> Path:
    return write_tiny_config(tmp_path / "tiny.yaml", {"data": {"scale_range": [1.0, 1.0], "demo_num_val": 2},
                                                      "train": {"device": "cpu"}})


def _trainer(tiny_cfg: Path, tmp_path: Path, *overrides: str):
    from tscd.train import Trainer

    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)
    cfg = load_config(tiny_cfg, [f"train.run_dir={tmp_path / 'run'}", *overrides])
    return Trainer(cfg, resume="never")


# -- peak memory --------------------------------------------------------------------------------

def test_peak_memory_on_cpu_sees_a_known_allocation():
    with PeakMemory("cpu") as pm:
        a = torch.empty(250_000)  # 1 MB, freed below
        del a
        kept = torch.empty(1000, dtype=torch.float64)  # 8 kB, still alive at the end
    assert pm.peak_bytes >= 1_000_000
    assert pm.net_bytes == 8000
    assert kept.numel() == 1000


def test_tensor_and_state_bytes_count_storages_once():
    t = torch.zeros(10, 10)
    assert tensor_bytes([t, t[:1], t.view(-1)]) == 400
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    s = state_bytes(net, opt)
    assert s["weights"] == 40 and s["grads"] == 40
    assert s["optimizer"] == 2 * 40 + 2 * 4  # exp_avg, exp_avg_sq per parameter, plus the float32 step counters


# -- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [("train.checkpointing=decoder", "train.checkpointing"),
                                           ("train.memory=tiny", "train.memory")])
def test_bad_memory_keys_are_rejected(override, key):
    with pytest.raises(ConfigError, match=f"`{key}` must be one of"):
        load_config(None, ["data.dataset=demo", override])


def test_low_memory_mode_sets_amp_checkpointing_and_accumulation():
    cfg = load_config(None, ["data.dataset=demo", "data.batch_size=4"])
    assert [c.key for c in resolve_config(cfg, "cpu", world_size=1)[1]] == ["train.device"]  # default: unchanged
    cfg.train.memory = "low"
    low, _ = resolve_config(cfg, "cpu", world_size=1)
    assert (low.train.amp, low.train.checkpointing) == ("bf16", "all")
    assert (cfg.train.amp, cfg.train.checkpointing) == ("off", "off")  # the input is not modified
    # micro-batches of one image per process
    assert low.train.accum_steps == 4
    assert resolve_config(cfg, "cpu", world_size=2)[0].train.accum_steps == 2


def test_trainer_applies_memory_settings(tiny_cfg, tmp_path):
    t = _trainer(tiny_cfg, tmp_path, "train.checkpointing=encoder")
    assert t.net.checkpointing == "encoder" and t.net.encoder.grad_checkpointing
    assert not t.net.decoder.grad_checkpointing and not t.amp
    t = _trainer(tiny_cfg, tmp_path, "train.memory=low")
    assert t.net.checkpointing == "all" and t.net.decoder.grad_checkpointing and t.amp
    assert t.cfg.train.amp == "bf16"


# -- nothing kept alive across iterations ------------------------------------------------------

def test_train_step_leaves_no_tensors_behind(tiny_cfg, tmp_path):
    t = _trainer(tiny_cfg, tmp_path, "train.cam_iters=0")
    batches = t._batches()
    t.iteration = 1
    t.train_step(next(batches))  # creates the optimizer state
    batch = next(batches)
    t.iteration = 2
    t.recipe.last = {}  # start from weights + optimizer state only
    with PeakMemory("cpu") as pm:
        t.train_step(batch)
    del batch
    assert all(p.grad is None for p in t.net.parameters())  # gradients are freed after the step
    # the only tensors that survive are one image's copies kept for TensorBoard (not views of the batch)
    for k, v in t.recipe.last.items():
        assert v.shape[0] == 1 and v.untyped_storage().nbytes() == v.numel() * v.element_size(), k
    assert pm.peak_bytes > 1_000_000  # the measurement saw the iteration
    assert pm.net_bytes <= tensor_bytes(t.recipe.last.values())


# -- dry run ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_dry_run_cli_prints_time_and_peak_and_writes_nothing(tiny_cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(tiny_cfg), "--run-dir", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seconds / iteration:" in out and "peak memory:" in out and "CPU allocator" in out
    # warm-up forced off: iteration 1 already has every loss term (cam_iters is 2 in the config)
    for term in ("seg=", "aff=", "reg=", "scd="):
        assert term in out
    assert not run.exists()


@pytest.mark.slow
def test_dry_run_low_memory_has_a_lower_peak(tiny_cfg):
    cfg = load_config(tiny_cfg, ["train.run_dir=unused", "data.crop_size=96", "data.demo_size=96"])
    default = dry_run(cfg, iterations=2)
    cfg.train.memory = "low"
    low = dry_run(cfg, iterations=2)
    assert len(default.seconds) == 1 and default.seconds_per_iteration > 0
    assert sum(default.state_bytes.values()) < default.peak_bytes
    assert low.peak_bytes < default.peak_bytes
    with pytest.raises(ValueError, match="`iterations` must be >= 2"):
        dry_run(cfg, iterations=1)


def test_shipped_low_memory_config_is_voc_in_low_memory_mode():
    root = Path(__file__).resolve().parents[2] / "configs"
    low = load_config(root / "voc_lowmem.yaml", ["data.root=/data/voc"])
    voc = load_config(root / "voc.yaml", ["data.root=/data/voc"])
    assert low.train.memory == "low" and voc.train.memory == "default"
    resolved, _ = resolve_config(low, "cpu", world_size=1)
    assert (resolved.train.amp, resolved.train.checkpointing) == ("bf16", "all")
    low_d, voc_d = low.to_dict(), voc.to_dict()
    for d in (low_d, voc_d):
        d["train"].pop("memory")
        d["train"].pop("run_dir")
    assert low_d == voc_d  # otherwise the paper's setting
