"""Argument checks shared by every op: messages name the op, the argument, what was expected and got."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _fmt_shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(op: str, name: str, t: object, *, ndim: int | None = None, layout: str = "",
                 floating: bool = True, dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank ``ndim`` with a floating (or one of ``dtypes``) dtype.

    Raises:
        TypeError: not a tensor, or the wrong dtype.
        ValueError: the wrong number of dimensions, or an empty tensor.
    """
    what = f"{ndim}-D " if ndim is not None else ""
    kind = "float " if floating else ""
    expect = f"`{name}` must be a {what}{kind}tensor{(' ' + layout) if layout else ''}"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {expect}; got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: `{name}` must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {expect}; got dtype {str(t.dtype).replace('torch.', '')} (convert with .float())")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {expect}; got shape {_fmt_shape(t)}")
    if t.numel() == 0:
        raise ValueError(f"{op}: `{name}` must not be empty; got shape {_fmt_shape(t)}")
    return t


def check_dim(op: str, name: str, t: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    """Check ``t.shape[dim] == expected`` (``meaning`` says what that size is, e.g. "3 channels (RGB)")."""
    if t.shape[dim] != expected:
        raise ValueError(f"{op}: `{name}` must have {meaning} in dim {dim} (size {expected}); "
                         f"got shape {_fmt_shape(t)}")


def check_same_batch(op: str, **tensors: torch.Tensor) -> None:
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"`{n}` has {s}" for n, s in sizes.items())
        raise ValueError(f"{op}: batch sizes differ: {listed}")


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"`{n}` on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {listed}")
    return next(iter(devices.values()))


def check_positive_ints(op: str, name: str, values: Sequence[int], *, allow_empty: bool = False) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except TypeError:
        raise TypeError(f"{op}: `{name}` must be a sequence of positive ints; got {values!r}") from None
    if any(v != orig or v <= 0 for v, orig in zip(out, values)) or (not out and not allow_empty):
        raise ValueError(f"{op}: `{name}` must be a non-empty sequence of positive ints; got {list(values)!r}")
    return out


def check_finite_scalar(op: str, name: str, v: object, *, positive: bool = False) -> float:
    """``float(v)``, checked to be finite (and > 0 with ``positive``)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: `{name}` must be a real number; got {v!r}") from None
    if not math.isfinite(f) or (positive and not f > 0):
        raise ValueError(f"{op}: `{name}` must be {'> 0 and ' if positive else ''}finite; got {v!r}")
    return f


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Raise ValueError if ``t`` holds a NaN or +-inf, naming the first one.

    This reads a flag back to the host (a device sync): for inference-time ops only (e.g. dense_crf); the
    training ops propagate NaN on the device instead.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return  # integers are finite
    # fast path: the float64 sum is finite iff every value is (a NaN or +-inf makes it NaN or +-inf; a float32 or
    # half tensor cannot overflow it); only a non-finite sum (or a float64 overflow) runs the element-wise check
    if bool(torch.isfinite(t.sum(dtype=torch.complex128 if t.is_complex() else torch.float64))):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        idx = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"{op}: `{name}` must hold finite values; got {t[idx].item()} at index {idx} "
                         f"({int((~finite).sum())} non-finite of {t.numel()})")
