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


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float | torch.Tensor,
                 name: str = "") -> None:
    """``torch.testing.assert_close`` that reports how many elements differ, the worst error and where.

    ``atol`` may be a tensor (broadcast against ``expected``): a tolerance per element, such as
    :func:`lattice_error_scale`'s.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values, first at {bad}")
    err = (a - e).abs()
    if isinstance(atol, torch.Tensor):
        atol = atol.detach().double().cpu()
    tol = atol + rtol * e.abs()
    bad = err > tol
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = int(err.argmax())
        first = int(bad.flatten().nonzero()[0])
        atol_text = (f"atol={atol}" if not isinstance(atol, torch.Tensor)
                     else f"atol per element, {atol.expand_as(e).flatten()[first].item():.3e} at the first")
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ (rtol={rtol}, {atol_text}); "
            f"max abs error {err.max().item():.3e} at flat index {worst} "
            f"(got {a.flatten()[worst].item():.6e}, expected {e.flatten()[worst].item():.6e}); first at {idx}"
        )


def lattice_error_scale(x: torch.Tensor, features: torch.Tensor, normalize: bool, include_self: bool, *,
                        backward: bool = False) -> torch.Tensor:
    """Per element, the magnitude that the rounding errors of ``permutohedral_fwd`` (or ``_bwd`` with
    ``backward``) ``(x, features, normalize, include_self)`` scale with (float64, ``x``'s shape), computed with the
    CPU op in float64: two float32 implementations that sum in different orders (the CUDA kernels' atomics, the CPU
    op's loops) may differ by a small multiple of float32's epsilon times this, so a tolerance is
    ``atol + rtol * lattice_error_scale(...)``.

    The unnormalised filter: the filter applied to ``|x|`` (every lattice weight is >= 0, so this is the absolute
    sum of the terms; with a signed ``x`` it is far above ``|result|`` where the terms cancel). The backward applies
    the transposed lattice (not the same: the blur's directions do not commute on a sparse table).

    The normalised filter divides by the row sum ``den = L1 - s`` (``L1``: the filter of ones; ``s`` = 1 without
    the self term, else 0), whose own rounding is amplified by its condition number ``(L1 + s) / |den|``. Without
    the self term ``den`` crosses zero where the lattice's self weight (about 0.7-0.85 of the exact 1) barely
    differs from the 1 that is subtracted (points isolated in feature space): there the op's result is
    ill-conditioned, its float32 digits depend on the summation order, and this scale grows accordingly.
    """
    f = features.detach().double()
    a = x.detach().double().abs()
    s = 0.0 if include_self else 1.0

    def lattice(t):
        return torch.ops.tscd.permutohedral_fwd(t, f, False, True)

    def transposed(t):
        return torch.ops.tscd.permutohedral_bwd(t, f, False, True)

    apply = transposed if backward else lattice
    if not normalize:
        return apply(a) + s * a
    l1 = lattice(torch.ones_like(a[:, :1]))
    den = (l1 - s).abs().clamp_min(1e-300)
    amplification = 1 + (l1 + s) / den
    if backward:  # grad = L^T (g / den) - s g / den
        h = a / den * amplification
        return transposed(h) + s * h
    out = (lattice(x.detach().double()) - s * x.detach().double()) / den
    return (lattice(a) + s * a) / den + out.abs() * amplification


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
