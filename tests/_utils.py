"""Test helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CPU_ISA_LEVELS = {"baseline": 0, "avx2": 1, "avx512": 2}  # TSCD_CPU_ISA's values, as torch.ops.tscd.cpu_isa_level()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, name: str = "") -> None:
    """``torch.testing.assert_close`` that reports how many elements differ, the worst error and where."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values, first at {bad}")
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = err > tol
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = int(err.argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"max abs error {err.max().item():.3e} at flat index {worst} "
            f"(got {a.flatten()[worst].item():.6e}, expected {e.flatten()[worst].item():.6e}); first at {idx}"
        )


#: The tiny training run the tests start from (the demo set at 64 px, a tiny MiT, a few iterations: CPU seconds).
#: Modules change what their tests need with :func:`tiny_overrides` / :func:`write_tiny_config`.
TINY_CONFIG: dict[str, dict] = {
    "data": {"dataset": "demo", "root": None, "train_split": "train", "val_split": "val", "crop_size": 64,
             "scale_range": [0.8, 1.2], "batch_size": 2, "num_workers": 0, "demo_num_train": 8, "demo_num_val": 4,
             "demo_size": 64, "val_num": 2},
    "model": {"name": "tscd_mit_tiny", "decoder_dim": 32, "drop_path_rate": 0.1},
    "pseudo": {"cam_scales": [1.0, 0.5], "refine_iters": 3},
    "loss": {"scd_samples": 6},
    "optim": {"lr": 1.0e-3, "warmup_iters": 2},
    "train": {"max_iters": 6, "cam_iters": 2, "log_iters": 1, "val_iters": 0, "ckpt_iters": 3, "keep_ckpts": 2,
              "seed": 3, "tensorboard": False, "plots": False},
}


def tiny_config(changes: dict | None = None) -> dict:
    """:data:`TINY_CONFIG` with ``changes`` (``{section: {key: value}}``) merged in."""
    out = {sec: dict(values) for sec, values in TINY_CONFIG.items()}
    for sec, values in (changes or {}).items():
        out.setdefault(sec, {}).update(values)
    return out


def write_tiny_config(path, changes: dict | None = None):
    """Write :func:`tiny_config` as YAML to ``path``; returns the path."""
    import yaml

    path.write_text(yaml.safe_dump(tiny_config(changes), sort_keys=False))
    return path


def tiny_overrides(run_dir=None, changes: dict | None = None) -> list[str]:
    """:func:`tiny_config` as ``section.key=value`` overrides (for ``load_config(None, ...)``), plus the run dir."""
    import yaml

    out = [f"{sec}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
           for sec, values in tiny_config(changes).items() for key, value in values.items()]
    return out + ([f"train.run_dir={run_dir}"] if run_dir is not None else [])


def run_with_cpu_isa(isa: str, code: str, timeout: float = 600) -> str:
    """Runs ``code`` in a child Python process whose CPU kernels run instruction set ``isa`` (TSCD_CPU_ISA: the level
    is read once per process), on 2 OpenMP threads, from the repository root; returns its stdout.

    Skips when this CPU lacks ``isa``. The child first checks that the kernels report that level, then runs
    ``code``; a failure shows the end of the child's stderr.
    """
    supported = int(torch.ops.tscd.cpu_isa_supported())
    if CPU_ISA_LEVELS[isa] > supported:
        have = {v: k for k, v in CPU_ISA_LEVELS.items()}[supported]
        pytest.skip(f"this CPU cannot run the {isa} kernels (the widest it supports is {have})")
    env = dict(os.environ, TSCD_CPU_ISA=isa, OMP_NUM_THREADS="2")
    env.pop("TSCD_CORRELATION_ISA", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    check = ("import torch, tscd.kernels\n"
             f"assert torch.ops.tscd.cpu_isa_level() == {CPU_ISA_LEVELS[isa]}, torch.ops.tscd.cpu_isa_level()\n"
             f"assert torch.ops.tscd.correlation_isa_level() == {CPU_ISA_LEVELS[isa]}\n")
    proc = subprocess.run([sys.executable, "-c", check + code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
