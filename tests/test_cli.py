"""The command line and the training start-up as a user meets them: one grammar, clean user errors, nothing left
behind, robust resume (issue 14, items 3-10)."""
from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._utils import write_tiny_config
from tscd.cli import main, split_overrides
from tscd.config import load_config
from tscd.errors import CheckpointError
from tscd.train import checkpoint as ckpt
from tscd.train.trainer import RecentRate, due, format_eta

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_tiny_config(tmp_path / "tiny.yaml", {"train": {"max_iters": 8, "cam_iters": 4}})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- item 8: one grammar ---------------------------------------------------------------------------------------------

def test_split_overrides_anywhere_and_set_alias():
    rest, overrides, notes = split_overrides(["train.max_iters=3", "--config", "c.yaml", "data.batch_size=4",
                                              "--run-dir", "r", "--set", "loss.seg=0", "--set=loss.aff=0.5", "x.png",
                                              "--", "a.b=c"])
    assert rest == ["--config", "c.yaml", "--run-dir", "r", "x.png", "--", "a.b=c"]
    assert overrides == ["train.max_iters=3", "data.batch_size=4", "loss.seg=0", "loss.aff=0.5"]
    assert len(notes) == 2 and all("deprecated" in n for n in notes)
    # paths and option values that merely contain '=' or '.' stay where they are
    assert split_overrides(["photos/a.png", "--out", "o=1", "./x.y=z"])[1] == []


# -- item 3: ckpt_iters 0 -----------------------------------------------------------------------------------------

def test_due():
    assert [i for i in range(1, 11) if due(i, 3, 10)] == [3, 6, 9, 10]
    assert [i for i in range(1, 11) if due(i, 0, 10)] == [10]  # 0: only at the end (was a ZeroDivisionError)


# -- items 3, 4, 6, 8, 10 end to end: one short run ----------------------------------------------------------------

@pytest.mark.slow
def test_train_run_end_to_end(tiny, tmp_path, capsys):
    """Options after overrides, --max-iters scaling the warm-up, ckpt_iters=0, stale temporaries removed (only
    ours), the checkpoint mode, the log line, and `tscd eval` reproducing training validation by default."""
    run = tmp_path / "run"
    cdir = run / "checkpoints"
    cdir.mkdir(parents=True)
    dead = _dead_pid()
    stale = [cdir / f".ckpt_0000002.pt.{dead}.k3j_x1.tmp", cdir / ".ckpt_0000001.pt.q1w2e3r4.tmp"]  # + old naming
    kept = [cdir / ".ckpt_0000003.pt.1.abcdef.tmp",  # pid 1 is alive: someone else's write in progress
            cdir / ".notes.tmp", cdir / "ckpt_0000001.pt.bak", run / ".ckpt_0000001.pt.a1b2c3.tmp"]
    for p in stale + kept:
        p.write_bytes(b"x" * 100)
    old_umask = os.umask(0o022)
    try:
        rc = main(["train", "train.ckpt_iters=0", "--config", str(tiny), "loss.scd=0", "--run-dir", str(run),
                   "--max-iters", "3", "train.val_iters=0"])
    finally:
        os.umask(old_umask)
    assert rc == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert [i for i, _ in ckpt.list_checkpoints(run)] == [3]  # ckpt_iters=0: the final one only
    path = ckpt.list_checkpoints(run)[0][1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the umask, not mkstemp's 0600
    state = ckpt.load_checkpoint(path)
    assert state["config"]["train"]["cam_iters"] == 1 and state["config"]["loss"]["scd"] == 0.0  # 4 * 3 // 8
    # the warm-up is cam_iters + 1 = 2 cls-only iterations (the official 0-based loop), then all losses
    assert "seg" not in state["history"][1] and "seg" in state["history"][2]
    log = (run / "train.log").read_text()
    assert "`train.cam_iters` 4 > 3; scaled" in log
    assert "iter 3/3" in log and "nan MiB" not in log
    if state["config"]["train"]["device"] == "cpu" or not torch.cuda.is_available():
        assert "peak" not in log  # CPU: no allocator peak to print
    else:
        assert " MiB" in log
    assert "removed 2 stale temporary checkpoint file(s)" in log
    assert "protocol native" in log
    capsys.readouterr()
    final = json.loads((run / "final_scores.json").read_text())
    out = tmp_path / "ev"
    assert main(["eval", "--checkpoint", str(path), "--out", str(out), "--outputs", "seg,cam,pseudo",
                 "--num-images", "2"]) == 0
    assert "protocol native" in capsys.readouterr().out
    report = json.loads((out / "results_val_native.json").read_text())
    assert report["protocol"] == "native"
    for key in ("seg", "cam", "pseudo"):  # one evaluator, one default protocol: the same numbers
        assert report["results"][key]["miou"] == pytest.approx(final[key]["miou"], abs=1e-9), key
    # pictures on request: `tscd eval --grid` (5 columns, as val_grid.png) and `tscd infer --grid` (3 with --cam)
    from PIL import Image

    from tscd.data.demo import write_demo

    assert main(["eval", "--checkpoint", str(path), "--out", str(out), "--num-images", "2", "--grid", "2",
                 "--overwrite"]) == 0
    grid = out / "grid_val_native.png"
    assert f"picture (grid): {grid}" in capsys.readouterr().out
    write_demo(tmp_path / "imgs", num_train=2, num_val=1, size=48)
    pred = tmp_path / "pred"
    assert main(["infer", "--checkpoint", str(path), str(tmp_path / "imgs" / "JPEGImages"), "--out", str(pred),
                 "--cam", "--grid", "2", "--scales", "1", "--no-flip", "--resize-long", "0"]) == 0
    assert f"picture (grid): {pred / 'grid.png'}" in capsys.readouterr().out
    with Image.open(grid) as g5, Image.open(pred / "grid.png") as g3:
        assert g5.size == (round(5 * 1.5 * 80), g3.size[1]) and g3.size[0] == round(3 * 1.5 * 80)  # 2 rows each
    assert main(["eval", "--checkpoint", str(path), "--out", str(out), "--grid", "0"]) == 2
    assert "`--grid` must be >= 1" in capsys.readouterr().err


# -- item 5: resume from the newest readable checkpoint ------------------------------------------------------------

def _fake_state(iteration: int) -> dict:
    return {k: 0 for k in ckpt.REQUIRED_KEYS} | {"iteration": iteration}


def test_find_resumable_skips_corrupt_and_truncated(tmp_path, caplog):
    for i in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, i, _fake_state(i), keep=10)
    files = dict(ckpt.list_checkpoints(tmp_path))
    data = files[4].read_bytes()
    files[4].write_bytes(data[: len(data) // 2])  # truncated
    files[3].write_bytes(b"not a checkpoint")  # corrupt
    torch.save({"model": {}}, files[2])  # readable, but not a trainer checkpoint
    with caplog.at_level(logging.WARNING, logger="tscd.train.checkpoint"):
        path, state = ckpt.find_resumable(tmp_path)
    assert path == files[1] and state["iteration"] == 1
    text = caplog.text
    assert all(files[i].name in text for i in (2, 3, 4)) and "resuming from" in text
    assert "not a trainer checkpoint" in text and "corrupt" in text
    files[1].write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 4 checkpoint"):
        ckpt.find_resumable(tmp_path)
    assert ckpt.find_resumable(tmp_path / "empty") is None


def test_trainer_resumes_past_a_truncated_checkpoint(tiny, tmp_path):
    from tscd.train import Trainer

    cfg = load_config(tiny, [f"train.run_dir={tmp_path / 'run'}", "train.max_iters=1", "train.cam_iters=1"])
    trainer = Trainer(cfg, resume="never")
    trainer.validate = lambda: {}
    trainer.train()
    good = ckpt.list_checkpoints(tmp_path / "run")[-1][1]
    (good.parent / "ckpt_0000005.pt").write_bytes(good.read_bytes()[:1000])  # newer, truncated
    resumed = Trainer(cfg, resume="auto")
    assert resumed.iteration == 1
    # the truncated file is kept for inspection but no longer counts as a checkpoint of the run
    assert (good.parent / "ckpt_0000005.pt.corrupt").is_file()
    assert [i for i, _ in ckpt.list_checkpoints(tmp_path / "run")] == [1]


def test_remove_stale_tmp_only_ours(tmp_path):
    cdir = tmp_path / "checkpoints"
    cdir.mkdir()
    mine = cdir / f".ckpt_0000010.pt.{_dead_pid()}.abc_12.tmp"
    theirs = cdir / f".ckpt_0000010.pt.{os.getppid()}.abc_12.tmp"  # a live process
    other = [cdir / ".ckpt_0000010.pt", cdir / "ckpt_0000010.pt.tmp", cdir / ".model.pt.abc.tmp"]
    for p in [mine, theirs, *other]:
        p.write_bytes(b"1")
    assert ckpt.remove_stale_tmp(tmp_path) == [mine]
    assert theirs.exists() and all(p.exists() for p in other)
    assert ckpt.remove_stale_tmp(tmp_path / "nothing") == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_mode_follows_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, _fake_state(1), keep=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


# -- item 7 and 10: user errors, failed starts ---------------------------------------------------------------------

@pytest.mark.parametrize("case", ["unknown_key", "missing_root", "data_error", "bad_value", "bad_resume"])
def test_train_user_errors_are_one_line_and_leave_nothing(case, tiny, tmp_path, capsys):
    run = tmp_path / "run"
    extra = {"unknown_key": ["train.max_iter=3"],
             "missing_root": ["data.dataset=voc", f"data.root={tmp_path / 'no_such_dir'}"],
             "data_error": ["data.dataset=voc", f"data.root={_broken_voc(tmp_path)}", "data.train_split=train"],
             "bad_value": ["train.ckpt_iters=-5"],
             "bad_resume": ["--resume", str(tmp_path / "missing.pt")]}[case]
    rc = main(["train", "--config", str(tiny), "--run-dir", str(run), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].startswith("tscd train: error: ") and "Traceback" not in err, err
    assert not run.exists()  # a failed start leaves no run directory behind
    if case == "data_error":
        assert "data.skip_bad=true" in err and "skip_bad=True in Python" in err


def test_debug_shows_the_traceback_and_bugs_are_not_hidden(tiny, tmp_path, monkeypatch):
    with pytest.raises(Exception, match="unknown key"):
        main(["train", "--config", str(tiny), "--run-dir", str(tmp_path / "r"), "train.max_iter=3", "--debug"])
    import tscd.train

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(tscd.train, "Trainer", bug)
    with pytest.raises(KeyError, match="a bug"):  # not a user error: the traceback is shown
        main(["train", "--config", str(tiny), "--run-dir", str(tmp_path / "r2")])
    assert not (tmp_path / "r2").exists()


def _broken_voc(tmp_path: Path) -> Path:
    """A VOC-layout folder whose train list names an image without its mask."""
    from tscd.data.demo import write_demo

    root = tmp_path / "voc"
    write_demo(root, num_train=4, num_val=2, size=32)
    next((root / "SegmentationClassAug").glob("demo_train_*.png")).unlink()
    return root


# -- item 9: validation masks are checked at start-up --------------------------------------------------------------

def test_bad_validation_mask_fails_at_start_up(tiny, tmp_path, caplog):
    from tscd.data import DataError
    from tscd.data.demo import write_demo
    from tscd.train import Trainer

    root = tmp_path / "demo"
    write_demo(root, num_train=4, num_val=3, size=64)
    bad = root / "SegmentationClassAug" / "demo_val_00001.png"
    mask = np.asarray(Image.open(bad)).copy()
    mask[0, 0] = 77  # not a class
    im = Image.fromarray(mask, mode="P")
    im.putpalette(Image.open(bad).getpalette())
    im.save(bad)
    overrides = [f"data.root={root}", "data.val_num=null", f"train.run_dir={tmp_path / 'run'}"]
    with pytest.raises(DataError, match=r"validation split 'val'.*demo_val_00001.*data.skip_bad=true"):
        Trainer(load_config(tiny, overrides), resume="never")
    assert not (tmp_path / "run").exists()  # before anything was written
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(load_config(tiny, [*overrides, "data.skip_bad=true"]), resume="never")
    assert len(trainer.val_set) == 2 and "demo_val_00001" not in trainer.val_set.names
    assert "left out 1 image(s) with bad masks" in caplog.text


# -- item 10: small ones -------------------------------------------------------------------------------------------

def test_eta_uses_the_recent_rate():
    rate = RecentRate(window=10)
    t = 0.0
    for i in range(0, 101):  # warm-up: 0.1 s/it
        rate.mark(i, t)
        t += 0.1
    for i in range(101, 131):  # full loss: 1 s/it
        t += 0.9
        rate.mark(i, t)
        t += 0.1
    assert rate.seconds_per_iter() == pytest.approx(1.0)
    assert rate.eta(100) == pytest.approx(100.0)
    assert format_eta(3725) == "1:02:05" and format_eta(90000) == "1d 1:00:00" and format_eta(float("nan")) == "?"


def test_random_init_warning_names_no_missing_file(caplog):
    from tscd.models.mit import create_backbone

    with caplog.at_level(logging.WARNING, logger="tscd.models.mit"):
        create_backbone("mit_tiny")
    assert "RANDOMLY INITIALISED" in caplog.text and "mit_tiny.pth" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tscd.models.mit"):
        create_backbone("mit_b0")
    assert "mit_b0.pth" in caplog.text


def test_no_spec_md_in_the_repository():
    """docs/method.md is the method description users can read; SPEC.md is not part of the repository."""
    assert (ROOT / "docs" / "method.md").is_file()
    found = []
    docs = [*ROOT.glob("docs/**/*.md")]
    for path in [*ROOT.glob("tscd/**/*.py"), *ROOT.glob("configs/*.yaml"), ROOT / "README.md", *docs]:
        if "SPEC.md" in path.read_text(errors="replace"):
            found.append(str(path.relative_to(ROOT)))
    assert not found, f"cite docs/method.md instead of SPEC.md in: {found}"


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{tmp}/none.pt"],
    ["infer", "--checkpoint", "{tmp}/none.pt", "{tmp}", "--out", "{tmp}/o"],
    ["pseudo-labels", "--checkpoint", "{tmp}/none.pt", "--out", "{tmp}/o"],
    ["data", "voc", "--root", "{tmp}/nope"],
    ["bench", "no_such_op"],
    ["train", "--config", "{tmp}/none.yaml"],
])
def test_every_command_reports_user_errors_in_one_line(argv, tmp_path, capsys):
    rc = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(f"tscd {argv[0]}: error: ")]
    assert len(lines) == 1, err


def test_data_error_during_training_is_one_line_and_logged(tiny, tmp_path, capsys):
    """A file that passes the start-up checks but does not decode: one line, exit 2, and the line is in train.log."""
    from tscd.data.demo import write_demo

    root = tmp_path / "demo"
    write_demo(root, num_train=2, num_val=2, size=64)
    for img in (root / "JPEGImages").glob("demo_train_*.png"):
        img.write_bytes(b"not a png")
    run = tmp_path / "run"
    rc = main(["train", "--config", str(tiny), "--run-dir", str(run), f"data.root={root}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("tscd train: error: "))
    assert "demo_train_0000" in line
    assert line in (run / "train.log").read_text()


def test_console_logging_follows_sys_stderr(monkeypatch, capsys):
    """A stream replaced and closed after set-up (as test harnesses do) must not break later log records."""
    import io

    from tscd.cli import setup_logging

    old = io.StringIO()
    monkeypatch.setattr(sys, "stderr", old)
    setup_logging()
    old.close()
    monkeypatch.undo()
    logging.getLogger("tscd.test").warning("after the swap")
    err = capsys.readouterr().err
    assert "after the swap" in err and "Logging error" not in err


def test_help_imports_no_torch():
    """`tscd --help` (and every command's parser) is built without torch, timm or the data package: it answers
    at once instead of after seconds of imports."""
    code = ("import sys; from tscd.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy', 'tscd.data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "tscd", "--help"], capture_output=True, text=True, check=True)
    assert "data" in res.stdout and "eval" in res.stdout
