"""Reference for ``refine``: VARM (TSCD) and PAR (AFA) pixel-adaptive refinement, docs/method.md 4.1.

Plain, differentiable PyTorch that materialises every shifted copy (as the official code does, with
one-hot dilated convolutions there and clamped indexing here; the numbers are the same). Works on
any device and in float64. This is ``backend="torch"`` and the oracle of the tests; no speed tricks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Dilations of the 3x3 neighbourhood (docs/method.md 4.1).
DEFAULT_DILATIONS: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
#: The 8 offsets (dy, dx) of a 3x3 neighbourhood without its centre, in the official order.
OFFSETS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
#: Added to the standard deviation before dividing by it (the official code's 1e-8).
STD_EPS = 1e-8


def neighbour_shifts(dilations: Sequence[int]) -> list[tuple[int, int]]:
    """The (dy, dx) shift of each of the ``8 * len(dilations)`` neighbours, dilation-major."""
    return [(d * oy, d * ox) for d in dilations for oy, ox in OFFSETS]


def shift_clamped(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., y, x] = x[..., clamp(y + dy), clamp(x + dx)]`` (replicate border)."""
    H, W = x.shape[-2:]
    rows = (torch.arange(H, device=x.device) + dy).clamp(0, H - 1)
    cols = (torch.arange(W, device=x.device) + dx).clamp(0, W - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def _neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, n, H, W): every neighbour of every pixel."""
    return torch.stack([shift_clamped(x, dy, dx) for dy, dx in neighbour_shifts(dilations)], dim=2)


def position_prior(dilations: Sequence[int], pos_scale: float = 0.3, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """PAR's position term, softmax over the n neighbours (it is the same for every pixel).

    pos_o = d for axial and d * sqrt(2) for diagonal offsets, standardised by its (unbiased) std over
    the neighbours: softmax_o(-(pos_o / (std + 1e-8) / pos_scale)^2). Shape (n,).
    """
    pos = torch.tensor([d * (math.sqrt(2.0) if oy != 0 and ox != 0 else 1.0) for d in dilations for oy, ox in OFFSETS],
                       dtype=torch.float64)
    logits = -(pos / (pos.std() + STD_EPS) / pos_scale) ** 2
    return logits.softmax(0).to(dtype=dtype, device=device)


def refine_weights_reference(image: torch.Tensor, *, dilations: Sequence[int] = DEFAULT_DILATIONS, mode: str = "varm",
                             rgb_scale: float | None = None, aux_weight: float = 0.01,
                             pos_scale: float = 0.3) -> torch.Tensor:
    """The n = 8 * len(dilations) propagation weights of every pixel.

    Args:
        image: (B, 3, H, W) float, values in [0, 1].
        mode: ``"varm"`` (TSCD) or ``"par"`` (AFA).
        rgb_scale: factor of the appearance term; default 4 for varm (the code's factor; its ``w1`` is
            unused), 1/0.3 for par.
        aux_weight: weight of the second term: varm subtracts ``aux_weight * softmax(variation)``,
            par adds ``aux_weight * softmax(position prior)``.

    Returns:
        (B, n, H, W): ``softmax_o(a) -/+ aux_weight * softmax_o(second)``; sums to 1 -/+ aux_weight.
    """
    if rgb_scale is None:
        rgb_scale = 4.0 if mode == "varm" else 1.0 / 0.3
    X = _neighbours(image, dilations)  # (B, 3, n, H, W)
    sigma = X.std(dim=2, keepdim=True)  # unbiased, per channel, over the n neighbours
    appearance = -((rgb_scale * (image.unsqueeze(2) - X).abs() / (sigma + STD_EPS)) ** 2).mean(dim=1)
    weights = appearance.softmax(dim=1)  # (B, n, H, W)
    if mode == "varm":
        # Variation of each shifted map: squared forward differences down and right, inside the
        # shifted map, its last row / column replicated (difference 0 there).
        H, W = image.shape[-2:]
        down = X.index_select(-2, (torch.arange(H, device=X.device) + 1).clamp(max=H - 1))
        right = X.index_select(-1, (torch.arange(W, device=X.device) + 1).clamp(max=W - 1))
        variation = ((X - down) ** 2 + (X - right) ** 2).mean(dim=1)
        weights = weights - aux_weight * variation.softmax(dim=1)
    elif mode == "par":
        prior = position_prior(dilations, pos_scale, dtype=image.dtype, device=image.device)
        weights = weights + aux_weight * prior.view(1, -1, 1, 1)
    else:
        raise ValueError(f"refine: `mode` must be 'varm' or 'par'; got {mode!r}")
    return weights


def refine_reference(image: torch.Tensor, cam: torch.Tensor, *, dilations: Sequence[int] = DEFAULT_DILATIONS,
                     num_iter: int = 10, mode: str = "varm", rgb_scale: float | None = None, aux_weight: float = 0.01,
                     pos_scale: float = 0.3, num_channels: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """VARM / PAR refinement of ``cam`` guided by ``image`` (docs/method.md 4.1).

    ``cam`` is first resized to the image size (bilinear, align_corners=True), then propagated
    ``num_iter`` times: ``M(p) <- sum_o w_o(p) * M(clamp(p + d * o))`` with the weights of
    :func:`refine_weights_reference`. Channels ``k >= num_channels[b]`` of image b are returned as 0.

    Args:
        image: (B, 3, H, W) float in [0, 1].
        cam: (B, K, h, w) float.

    Returns:
        (B, K, H, W), differentiable w.r.t. ``cam`` and ``image``.
    """
    H, W = image.shape[-2:]
    if cam.shape[-2:] != (H, W):
        cam = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=True)
    weights = refine_weights_reference(image, dilations=dilations, mode=mode, rgb_scale=rgb_scale,
                                       aux_weight=aux_weight, pos_scale=pos_scale).unsqueeze(1)  # (B, 1, n, H, W)
    out = cam
    for _ in range(num_iter):
        out = (_neighbours(out, dilations) * weights).sum(dim=2)
    if num_channels is not None:
        nc = num_channels if isinstance(num_channels, torch.Tensor) else torch.as_tensor(list(num_channels))
        keep = torch.arange(cam.shape[1], device=cam.device).view(1, -1) < nc.to(cam.device).view(-1, 1)
        out = torch.where(keep.view(cam.shape[0], cam.shape[1], 1, 1), out, torch.zeros_like(out))  # NaN-free 0
    return out
