"""Affinity-refined CAMs: AFA's random walk with the predicted affinity (docs/method.md 6).

The model predicts a pairwise affinity ``A`` (B, N, N) in (0, 1) between the N = h * w positions of the 1/16
feature grid (row-major: position ``i = y * w + x``). The CAM is refined on that grid:

1. Scores with background: ``S = [bkg, cam_1 .. cam_C]`` (B, 1 + C, h, w) with a constant background score
   ``bkg`` (0.35), the CAM resized bilinearly to (h, w). Per image only the kept channels
   ``K = {background} U {present classes}`` are used, and ``P = softmax_K(S)`` over them (per position).
2. Transition matrix: with the radius mask ``M_ij = [max(|y_i - y_j|, |x_i - x_j|) <= r]`` (Chebyshev
   distance, r = 8, self-pairs included),

       T_ij = (M_ij * A_ij) ** power / (sum_k (M_kj * A_kj) ** power + eps),  power = 2, eps = 0.1,

   i.e. each *column* j is normalised by its sum plus ``eps`` (which also keeps isolated columns finite).
3. One step of the walk: ``R[k, j] = sum_i P[k, i] * T_ij`` (``R = P @ T``), for kept channels k; other
   channels are 0 (and masked out of the argmax by :func:`affinity_cam_label`).

This is ``propagte_aff_cam_with_bkg`` of AFA's ``utils/camutils.py`` (with ``n_log_iter = 0``), vectorised:
the mask is built with tensor ops once per (h, w, radius, device) and cached; the product is one ``bmm`` for
the whole batch. The affinity is the model's ``TSCDOutput.affinity`` for the same input, so (h, w) is the
model's 1/16 grid (``ceil(H / 16), ceil(W / 16)``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

#: Defaults of docs/method.md 6 (AFA): radius of the mask, power of the affinity, column-normalisation epsilon,
#: background score.
RW_RADIUS: int = 8
RW_POWER: float = 2.0
RW_EPS: float = 0.1
RW_BKG: float = 0.35


@functools.lru_cache(maxsize=16)
def _radius_mask_cached(h: int, w: int, radius: int, device: str) -> Tensor:
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return (dy <= radius) & (dx <= radius)


def radius_mask(h: int, w: int, radius: int = RW_RADIUS, device: torch.device | str = "cpu") -> Tensor:
    """(N, N) bool mask, N = h * w: True where the Chebyshev distance of positions i, j is <= ``radius``.

    Cached per (h, w, radius, device); do not modify the returned tensor.

    Raises:
        ValueError: non-positive grid size or negative radius.
    """
    if h < 1 or w < 1:
        raise ValueError(f"radius_mask: grid size must be positive; got (h, w) = ({h}, {w})")
    if radius < 0:
        raise ValueError(f"radius_mask: `radius` must be >= 0; got {radius}")
    return _radius_mask_cached(int(h), int(w), int(radius), str(torch.device(device)))


def transition_matrix(aff: Tensor, h: int, w: int, *, radius: int = RW_RADIUS, power: float = RW_POWER,
                      eps: float = RW_EPS) -> Tensor:
    """Column-normalised random-walk transition ``T`` from a predicted affinity (module docstring, step 2).

    Args:
        aff: (B, N, N) float affinity in [0, 1], N = h * w, any device.
        h, w: the grid the affinity lives on.
        radius: Chebyshev radius of the mask (pairs further apart get 0).
        power: exponent applied to the masked affinity.
        eps: added to each column sum before dividing.

    Returns:
        (B, N, N) float32 transition matrix.

    Raises:
        ValueError: ``aff`` is not (B, h*w, h*w).
    """
    n = h * w
    if aff.ndim != 3 or aff.shape[1] != n or aff.shape[2] != n:
        raise ValueError(f"transition_matrix: `aff` must be (B, N, N) with N = h * w = {n}; got shape "
                         f"{tuple(aff.shape)}")
    a = aff.detach().float().masked_fill(~radius_mask(h, w, radius, aff.device), 0.0).pow(power)
    return a / (a.sum(dim=1, keepdim=True) + eps)


def propagate_cam_with_bkg(cam: Tensor, aff: Tensor, cls_label: Tensor, *, bkg: float = RW_BKG,
                           radius: int = RW_RADIUS, power: float = RW_POWER, eps: float = RW_EPS,
                           grid: tuple[int, int] | None = None) -> Tensor:
    """Random-walk refined class scores with a background channel (module docstring).

    Args:
        cam: (B, C, H, W) CAM in [0, 1] (e.g. :func:`tscd.models.multi_scale_cam`) at the model input's size;
            it is resized bilinearly to the affinity's grid ``(h, w) = (ceil(H / 16), ceil(W / 16))``.
        aff: (B, N, N) predicted affinity on the (h, w) grid.
        cls_label: (B, C) multi-hot image labels (present classes).
        bkg: constant background score.
        radius, power, eps: see :func:`transition_matrix`.
        grid: the affinity's (h, w) when it comes from another input size than the CAM's (AFA propagates the CAM
            of the crop with the affinity of its 1.5x pass); default: the 1/16 grid of the CAM's size.

    Returns:
        (B, 1 + C, h, w) float32 scores; channels of absent classes are 0.

    Raises:
        ValueError: inconsistent shapes.
    """
    if cam.ndim != 4:
        raise ValueError(f"propagate_cam_with_bkg: `cam` must be (B, C, H, W); got shape {tuple(cam.shape)}")
    b, c, big_h, big_w = cam.shape
    if cls_label.shape != (b, c):
        raise ValueError(f"propagate_cam_with_bkg: `cls_label` must be (B, C) = ({b}, {c}); got "
                         f"{tuple(cls_label.shape)}")
    if grid is None:
        h, w = grid_size(big_h, big_w, aff.shape[-1])
    elif grid[0] * grid[1] != aff.shape[-1]:
        raise ValueError(f"propagate_cam_with_bkg: `grid` {tuple(grid)} has {grid[0] * grid[1]} positions; the "
                         f"affinity has {aff.shape[-1]}")
    else:
        h, w = grid
    cam_s = F.interpolate(cam.float(), size=(h, w), mode="bilinear", align_corners=False)
    scores = torch.cat([torch.full_like(cam_s[:, :1], bkg), cam_s], dim=1).flatten(2)  # (B, 1+C, N)
    keep = torch.cat([torch.ones_like(cls_label[:, :1], dtype=torch.bool), cls_label > 0.5], dim=1)  # (B, 1+C)
    probs = scores.masked_fill(~keep[:, :, None], float("-inf")).softmax(dim=1)  # zero on absent classes
    out = torch.bmm(probs, transition_matrix(aff, h, w, radius=radius, power=power, eps=eps))
    return out.view(b, c + 1, h, w)


def grid_size(height: int, width: int, n: int) -> tuple[int, int]:
    """The (h, w) affinity grid of an (height, width) input with N = ``n`` positions: (ceil(H/16), ceil(W/16)).

    Raises:
        ValueError: ``n`` does not equal ceil(H/16) * ceil(W/16) (the affinity belongs to another input).
    """
    h, w = -(-height // 16), -(-width // 16)
    if h * w != n:
        raise ValueError(f"random walk: the affinity has N = {n} positions, but an input of {height}x{width} has a "
                         f"1/16 grid of {h}x{w} = {h * w}; pass the CAM at the model input's size")
    return h, w


def affinity_cam_label(cam: Tensor, aff: Tensor, cls_label: Tensor, size: tuple[int, int], *, bkg: float = RW_BKG,
                       radius: int = RW_RADIUS, power: float = RW_POWER, eps: float = RW_EPS) -> Tensor:
    """Label map of the affinity-refined CAM: propagate, upsample to ``size`` (bilinear), argmax over kept classes.

    Args:
        cam: (B, C, H, W) CAM in [0, 1] at the model input's size (H, W).
        aff: (B, N, N) affinity of that input.
        cls_label: (B, C) multi-hot labels.
        size: output (height, width).

    Returns:
        (B, height, width) int64 labels in 0..C.
    """
    scores = propagate_cam_with_bkg(cam, aff, cls_label, bkg=bkg, radius=radius, power=power, eps=eps)
    scores = F.interpolate(scores, size=tuple(size), mode="bilinear", align_corners=False)
    keep = torch.cat([torch.ones_like(cls_label[:, :1], dtype=torch.bool), cls_label > 0.5], dim=1)
    return scores.masked_fill(~keep[:, :, None, None], float("-inf")).argmax(dim=1)
