"""Pseudo labels from multi-scale CAMs refined with VARM (or PAR), docs/method.md 3.

The reference refines each image twice (background scores 0.55 and 0.35), one call at a time. Here
both thresholds of every image go through one batched ``refine`` call: the weights depend on the
image only, so the two stacks are channels of the same call. Each image keeps only its
[background, present classes] channels; images with fewer present classes are zero-padded and the
padded channels are masked out of the argmax.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tscd.constants import IGNORE_INDEX
from tscd.kernels import refine


def box_mask(img_box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4) [top, bottom, left, right) boxes -> (B, H, W) bool, True inside."""
    ys = torch.arange(height, device=img_box.device).view(1, -1, 1)
    xs = torch.arange(width, device=img_box.device).view(1, 1, -1)
    top, bottom, left, right = (img_box[:, i].view(-1, 1, 1) for i in range(4))
    return (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)


def refine_cams_with_bkg(image01: torch.Tensor, cams: torch.Tensor, cls_label: torch.Tensor,
                         img_box: torch.Tensor | None = None, *, bkg_high: float = 0.55, bkg_low: float = 0.35,
                         scale: float = 0.5, mode: str = "varm", num_iter: int = 10,
                         dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), backend: str = "auto") -> torch.Tensor:
    """VARM-refined pseudo labels with two background thresholds (docs/method.md 3).

    Args:
        image01: (B, 3, H, W) de-normalised images in [0, 1].
        cams: (B, C, H, W) multi-scale CAMs in [0, 1] (no grad needed).
        cls_label: (B, C) multi-hot image labels.
        img_box: (B, 4) int64 [top, bottom, left, right) real-image region; None = the whole crop.
        scale: refinement resolution as a fraction of (H, W) (0.5 in the reference).

    Returns:
        (B, H, W) int64: class ids 1..C where the high run says foreground; 255 where only the high
        run says background; 0 where both say background; 255 outside ``img_box``.
    """
    B, C, H, W = cams.shape
    h, w = max(1, int(H * scale)), max(1, int(W * scale))
    img_s = F.interpolate(image01.float(), size=(h, w), mode="bilinear", align_corners=False)
    cams_s = F.interpolate(cams.float(), size=(h, w), mode="bilinear", align_corners=False)
    present = cls_label > 0.5
    P = 1 + int(present.sum(1).max().item()) if B else 1  # channels per stack: background + present classes
    keys = torch.zeros(B, P, dtype=torch.long, device=cams.device)  # class id of each kept channel (0 = bkg)
    valid = torch.zeros(B, P, dtype=torch.bool, device=cams.device)
    valid[:, 0] = True
    for b in range(B):
        ids = present[b].nonzero()[:, 0] + 1
        keys[b, 1:1 + ids.numel()] = ids
        valid[b, 1:1 + ids.numel()] = True
    stacks = []
    for bkg in (bkg_high, bkg_low):
        with_bkg = torch.cat([torch.full_like(cams_s[:, :1], bkg), cams_s], dim=1)  # (B, 1+C, h, w)
        kept = with_bkg.gather(1, keys.view(B, P, 1, 1).expand(B, P, h, w))
        kept = kept.masked_fill(~valid.view(B, P, 1, 1), float("-inf")).softmax(dim=1)  # over kept channels
        stacks.append(kept)
    refined = refine(img_s, torch.cat(stacks, dim=1), dilations=dilations, num_iter=num_iter, mode=mode,
                     backend=backend)  # one call: (B, 2P, h, w)
    refined = F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)
    labels = []
    for part in (refined[:, :P], refined[:, P:]):
        part = part.masked_fill(~valid.view(B, P, 1, 1), float("-inf"))
        labels.append(keys.gather(1, part.argmax(1).view(B, -1)).view(B, H, W))
    high, low = labels
    label = high.clone()
    label[high == 0] = IGNORE_INDEX
    label[(high == 0) & (low == 0)] = 0
    if img_box is not None:
        label[~box_mask(img_box, H, W)] = IGNORE_INDEX
    return label


def refine_cams_with_bkg_sequential(image01: torch.Tensor, cams: torch.Tensor, cls_label: torch.Tensor,
                                    img_box: torch.Tensor | None = None, *, bkg_high: float = 0.55,
                                    bkg_low: float = 0.35, scale: float = 0.5, mode: str = "varm",
                                    num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                                    backend: str = "torch") -> torch.Tensor:
    """The reference's structure (for benchmarks and tests): one refine call per image and threshold.

    Same arguments and result as :func:`refine_cams_with_bkg`.
    """
    B, C, H, W = cams.shape
    h, w = max(1, int(H * scale)), max(1, int(W * scale))
    img_s = F.interpolate(image01.float(), size=(h, w), mode="bilinear", align_corners=False)
    out = torch.full((B, H, W), IGNORE_INDEX, dtype=torch.long, device=cams.device)
    for b in range(B):
        present = (cls_label[b] > 0.5).nonzero()[:, 0] + 1
        keys = torch.cat([torch.zeros(1, dtype=torch.long, device=cams.device), present])
        labels = []
        for bkg in (bkg_high, bkg_low):
            stack = torch.cat([torch.full_like(cams[b:b + 1, :1], bkg), cams[b:b + 1].float()], 1)
            stack = F.interpolate(stack, size=(h, w), mode="bilinear", align_corners=False)[:, keys].softmax(1)
            ref = refine(img_s[b:b + 1], stack, dilations=dilations, num_iter=num_iter, mode=mode, backend=backend)
            ref = F.interpolate(ref, size=(H, W), mode="bilinear", align_corners=False)
            labels.append(keys[ref.argmax(1)][0])
        high, low = labels
        lab = high.clone()
        lab[high == 0] = IGNORE_INDEX
        lab[(high == 0) & (low == 0)] = 0
        out[b] = lab
    if img_box is not None:
        out[~box_mask(img_box, H, W)] = IGNORE_INDEX
    return out


def cam_to_label(cams: torch.Tensor, cls_label: torch.Tensor, bkg: float = 0.45) -> torch.Tensor:
    """Unrefined CAM label: argmax over present classes, background where the max score <= ``bkg``."""
    scores, idx = (cams * cls_label[:, :, None, None]).max(dim=1)
    label = idx + 1
    label[scores <= bkg] = 0
    return label
