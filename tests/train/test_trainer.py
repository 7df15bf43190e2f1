"""End-to-end training on tiny generated data: a short run, kill + resume, and DDP with 2 processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._utils import write_tiny_config
from tscd.cli import main
from tscd.eval.metrics import read_metrics
from tscd.train.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]

# extra overrides for every run of this module (all losses on by default)
EXTRA: list[str] = []


def _config(tmp_path: Path) -> Path:
    return write_tiny_config(tmp_path / "tiny.yaml", {"data": {"demo_num_train": 16}})


def _train_cmd(cfg: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tscd", "train", "--config", str(cfg), "--run-dir", str(run_dir), *EXTRA, *extra]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TSCD_BACKEND", None)
    return env


def _history(run_dir: Path) -> list[dict]:
    return load_checkpoint(list_checkpoints(run_dir)[-1][1])["history"]


@pytest.mark.slow
def test_train_runs_and_writes_everything(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path)), "--run-dir", str(run), *EXTRA,
                 "train.tensorboard=true"]) == 0
    out = capsys.readouterr().out
    assert "segmentation head" in out and "pseudo label (VARM)" in out and "chance level" in out
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file() and (run / "final_scores.json").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ckpts = list_checkpoints(run)
    assert [i for i, _ in ckpts] == [3, 6]  # keep_ckpts=2
    hist = _history(run)
    assert [h["iteration"] for h in hist] == list(range(1, 7))
    assert set(hist[0]) >= {"cls", "total", "lr"} and "seg" not in hist[1]  # warm-up: cls only
    assert {"cls", "seg", "aff"} <= set(hist[3])
    assert all(torch.isfinite(torch.tensor(h["total"])) for h in hist)
    log = (run / "train.log").read_text()
    assert "iter 6/6" in log and "val @6" in log
    [val] = read_metrics(run)
    assert (val["iteration"], val["protocol"], val["num_images"], sorted(val["miou"])) == (6, "native", 2,
                                                                                          ["cam", "pseudo", "seg"])
    assert set(val["iou"]["seg"]) == {"background", "disc", "square", "triangle", "ring", "cross"}


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path):
    cfg = _config(tmp_path)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_train_cmd(cfg, ref_dir), check=True, env=_env(), capture_output=True)
    proc = subprocess.Popen(_train_cmd(cfg, run_dir), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list_checkpoints(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: right after the first checkpoint (iteration 3)
    proc.wait()
    assert list_checkpoints(run_dir), "the run wrote no checkpoint before it was killed"
    subprocess.run(_train_cmd(cfg, run_dir), check=True, env=_env(), capture_output=True)  # auto-resume
    ref, resumed = _history(ref_dir), _history(run_dir)
    assert [h["iteration"] for h in resumed] == list(range(1, 7))
    for a, b in zip(ref, resumed):
        assert a == b, f"iteration {a['iteration']}: {a} != {b}"  # bit-for-bit on CPU
    sd_ref = load_checkpoint(list_checkpoints(ref_dir)[-1][1])["model"]
    sd_res = load_checkpoint(list_checkpoints(run_dir)[-1][1])["model"]
    assert all(torch.equal(sd_ref[k], sd_res[k]) for k in sd_ref)


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "tscd", "train", "--config", str(_config(tmp_path)), "--run-dir", str(run), *EXTRA,
           "train.max_iters=4", "train.ckpt_iters=4"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "validation mIoU after 4 iterations" in res.stdout
    state = load_checkpoint(list_checkpoints(run)[-1][1])
    assert state["iteration"] == 4 and any(k.endswith("running_mean") for k in state["model"])


def test_bad_config_key_fails_clearly(tmp_path, capsys):
    rc = main(["train", "--config", str(_config(tmp_path)), "--run-dir", str(tmp_path / "x"), "train.max_iter=3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown key `train.max_iter`" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_torch_backend_and_fused_kernels_give_the_same_loss_curve(tmp_path):
    """Same seed, same data: the pure-PyTorch references and the fused kernels train identically
    (up to float rounding) for several full iterations (pseudo labels, SCD, every loss but the CRF term:
    its torch backend is the exact dense Gaussian, the fused one the lattice approximation, compared in
    tests/kernels/test_permutohedral.py)."""
    from tscd.config import load_config
    from tscd.train import Trainer

    histories = {}
    for backend in ("torch", "auto"):
        cfg = load_config(_config(tmp_path), [*EXTRA, "loss.reg=0", f"train.backend={backend}", "train.max_iters=5",
                                              "train.ckpt_iters=5", "train.tensorboard=false",
                                              f"train.run_dir={tmp_path / backend}"])
        trainer = Trainer(cfg, resume="never")
        trainer.validate = lambda: {}  # the loss curve is what is compared here
        trainer.train()
        histories[backend] = trainer.history
    assert len(histories["torch"]) == 5
    for ref, fast in zip(histories["torch"], histories["auto"]):
        assert ref.keys() == fast.keys()
        for key in ref:
            assert abs(ref[key] - fast[key]) <= 1e-4 * max(1.0, abs(ref[key])), (ref["iteration"], key, ref, fast)


@pytest.mark.slow  # inductor compiles the CAM passes' four graphs (two scales x two views): about 45 s on 2 cores
def test_compiled_cam_passes_train_as_eager(tmp_path, caplog):
    """``train.compile: cams``: the same loss curve and weights as eager, drop-path on (the compiled passes draw
    its random numbers from the eager generator), and each graph compiled once, logged."""
    import logging

    from tscd.config import load_config
    from tscd.train import Trainer

    runs = {}
    for mode in ("off", "cams"):
        cfg = load_config(_config(tmp_path), [*EXTRA, f"train.compile={mode}", "train.max_iters=5",
                                              "train.ckpt_iters=5", f"train.run_dir={tmp_path / mode}"])
        trainer = Trainer(cfg, resume="never")
        trainer.validate = lambda: {}
        with caplog.at_level(logging.INFO, logger="tscd.models._compile"):
            trainer.train()
        runs[mode] = trainer
    torch._dynamo.reset()
    compiling = [r for r in caplog.records if "compiling the CAM pass" in r.getMessage()]
    assert len(compiling) == 4 == len(runs["cams"].recipe.steps.encode_fn.graphs)
    for ref, fast in zip(runs["off"].history, runs["cams"].history, strict=True):
        assert ref.keys() == fast.keys()
        for key in ref:
            assert abs(ref[key] - fast[key]) <= 1e-4 * max(1.0, abs(ref[key])), (ref["iteration"], key, ref, fast)
    for (name, a), b in zip(runs["off"].net.state_dict().items(), runs["cams"].net.state_dict().values()):
        if (name.startswith("decoder.linear_c.") and name.endswith(".bias")) or name == "decoder.fuse.bn.running_mean":
            # biases before the fuse BatchNorm: their gradient is zero but for rounding noise, which AdamW's
            # normalisation turns into lr-sized steps (and the BN's running mean follows them): not comparable
            continue
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


@pytest.mark.slow
def test_trained_checkpoint_evaluates_with_crf(tmp_path, capsys):
    """`tscd eval` reads what `tscd train` writes (RNG states and all), and its CRF path uses our dense_crf."""
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path)), "--run-dir", str(run), *EXTRA,
                 "train.max_iters=3", "train.cam_iters=1", "train.tensorboard=false"]) == 0
    ckpt = list_checkpoints(run)[-1][1]
    out_dir = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(ckpt), "--outputs", "seg,seg_ms,seg_ms_crf,cam,aff",
                 "--crf", "--num-images", "2", "--resize-long", "64", "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "seg_ms_crf" in text or "CRF" in text
    assert list(out_dir.glob("results_*.json")) and list(out_dir.glob("results_*.csv"))


def test_optimizer_is_multi_tensor_adamw_with_the_loop_numbers(tmp_path):
    """The trainer's AdamW runs its foreach form (torch's own choice on a GPU) and, on the CPU, gives the numbers of
    the per-parameter loop torch would pick there, bit for bit, over steps with weight decay and lr multipliers;
    a checkpoint that saved other group settings (foreach None, before this) resumes foreach."""
    import copy

    from tests._utils import tiny_overrides
    from tscd.config import load_config
    from tscd.train import Trainer

    tr = Trainer(load_config(None, [*tiny_overrides(tmp_path / "r"), "train.device=cpu"]), resume="never")
    opt = tr.optimizer
    assert all(g["foreach"] is True for g in opt.param_groups)
    twin = copy.deepcopy(tr.net)
    mapping = dict(zip((id(p) for p in tr.net.parameters()), twin.parameters()))
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "foreach": False,
               "params": [mapping[id(p)] for p in g["params"]]} for g in opt.param_groups]
    loop = torch.optim.AdamW(groups)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for p, q in zip(tr.net.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        loop.step()
    assert len({g["lr"] for g in opt.param_groups}) > 1  # lr multipliers exercised
    for (name, p), q in zip(tr.net.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
    state = opt.state_dict()
    for g in state["param_groups"]:
        g["foreach"] = None
    from tscd.train import checkpoint as ckpt

    path = ckpt.save_checkpoint(tr.run_dir, 4, {**tr.state_dict(), "optimizer": state}, 2)
    again = Trainer(load_config(None, [*tiny_overrides(tmp_path / "r"), "train.device=cpu"]), resume=str(path))
    assert all(g["foreach"] is True for g in again.optimizer.param_groups)
