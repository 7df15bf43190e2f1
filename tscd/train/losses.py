"""TSCD's loss terms (docs/method.md 4), other than the fused ops (SCD: tscd.kernels.correlation_loss; CRF energy:
tscd.kernels.dense_energy_loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tscd.constants import IGNORE_INDEX


def cls_loss(cls_logits: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
    """Multilabel soft-margin loss (mean BCE-with-logits) over the C classes (docs/method.md 4.4)."""
    return F.multilabel_soft_margin_loss(cls_logits, cls_label)


def seg_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Mean of two cross-entropies, over background-labelled and over foreground-labelled pixels.

    A term without any pixel is 0 (the reference's mean over zero pixels gives NaN).

    Args:
        logits: (B, C+1, H, W) at the label's size. label: (B, H, W) int64 with 255 ignore.
    """
    ce = F.cross_entropy(logits, label.clamp(max=logits.shape[1] - 1).masked_fill(label == IGNORE_INDEX, 0),
                         reduction="none")
    valid = label != IGNORE_INDEX
    terms = []
    for mask in (valid & (label == 0), valid & (label != 0)):
        n = mask.sum()
        terms.append((ce * mask).sum() / n.clamp(min=1))
    return 0.5 * (terms[0] + terms[1])


def affinity_label(label: torch.Tensor, size: tuple[int, int], radius: int = 8) -> torch.Tensor:
    """Pairwise affinity targets on the stage-4 grid (docs/method.md 4.3), vectorised.

    The label is nearest-resized to ``size`` and flattened; pair (u, v) is 1 for the same label,
    0 for different labels, 255 if either is 255 or their Chebyshev distance exceeds ``radius``.

    Returns:
        (B, N, N) uint8 with N = size[0] * size[1].
    """
    h, w = size
    small = F.interpolate(label.unsqueeze(1).float(), size=(h, w), mode="nearest").view(label.shape[0], -1).long()
    ys, xs = torch.meshgrid(torch.arange(h, device=label.device), torch.arange(w, device=label.device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    far = torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs()) > radius
    same = (small[:, :, None] == small[:, None, :]).to(torch.uint8)
    ignore = (small[:, :, None] == IGNORE_INDEX) | (small[:, None, :] == IGNORE_INDEX) | far.unsqueeze(0)
    return same.masked_fill(ignore, IGNORE_INDEX)


def affinity_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.5 * sum_{y=1} (1 - P) / (n1 + 1) + 0.5 * sum_{y=0} P / (n0 + 1), counts over the batch (docs/method.md 4.3).

    Args:
        pred: (B, N, N) predicted affinity in [0, 1]. target: (B, N, N) uint8 from :func:`affinity_label`.
    """
    pos = (target == 1).to(pred.dtype)
    neg = (target == 0).to(pred.dtype)
    return 0.5 * (pos * (1 - pred)).sum() / (pos.sum() + 1) + 0.5 * (neg * pred).sum() / (neg.sum() + 1)


def equivariance_loss(cam1: torch.Tensor, cam2: torch.Tensor) -> torch.Tensor:
    """``er: grad`` (an extension, docs/method.md 4.6): mean |down(cam1) - cam2| over all C channels, with gradient.

    cam1: (B, C, h1, w1) CAM of view 1; cam2: (B, C, h2, w2) CAM of the downscaled view 2.
    """
    down = F.interpolate(cam1, size=cam2.shape[-2:], mode="bilinear", align_corners=True)
    return (down - cam2).abs().mean()
