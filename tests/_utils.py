"""Test helpers."""
from __future__ import annotations

import torch


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
