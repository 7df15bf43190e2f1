"""Loss terms shared by the recipes (docs/method.md 4), other than the fused ops (SCD:
:func:`tscd.kernels.correlation_loss`; CRF energy: :func:`tscd.kernels.dense_energy_loss`), and the counts that
normalise the count terms (see :meth:`tscd.method.recipes.Recipe.counts`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tscd.constants import IGNORE_INDEX


def cls_loss(cls_logits: torch.Tensor, cls_label: torch.Tensor) -> torch.Tensor:
    """Multilabel soft-margin loss (mean BCE-with-logits) over the C classes (docs/method.md 4.4)."""
    return F.multilabel_soft_margin_loss(cls_logits, cls_label)


def seg_counts(label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(background, foreground) labelled pixels of a (B, H, W) label (255 ignored): the normalisers of
    :func:`seg_loss`."""
    return (label == 0).sum(), ((label != 0) & (label != IGNORE_INDEX)).sum()


def seg_loss(logits: torch.Tensor, label: torch.Tensor,
             counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean of two cross-entropies, over background-labelled and over foreground-labelled pixels.

    A term without any pixel is 0 (the reference's mean over zero pixels gives NaN).

    Args:
        logits: (B, C+1, H, W) at the label's size. label: (B, H, W) int64 with 255 ignore.
        counts: optional (background, foreground) pixel counts to divide by instead of this batch's (gradient
            accumulation: the counts of the whole batch, so that the micro-batch terms add up to its loss).
    """
    ce = F.cross_entropy(logits, label.clamp(max=logits.shape[1] - 1).masked_fill(label == IGNORE_INDEX, 0),
                         reduction="none")
    valid = label != IGNORE_INDEX
    terms = []
    for i, mask in enumerate((valid & (label == 0), valid & (label != 0))):
        n = mask.sum() if counts is None else torch.as_tensor(counts[i], device=logits.device)
        terms.append((ce * mask).sum() / n.clamp(min=1))
    return 0.5 * (terms[0] + terms[1])


def affinity_counts(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) pairs of an affinity target (:func:`tscd.method.affinity_label`): the normalisers of
    :func:`affinity_loss`."""
    return (target == 1).sum(), (target == 0).sum()


def affinity_loss(pred: torch.Tensor, target: torch.Tensor,
                  counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """0.5 * sum_{y=1} (1 - P) / (n1 + 1) + 0.5 * sum_{y=0} P / (n0 + 1), counts over the batch (docs/method.md 4.3).

    Args:
        pred: (B, N, N) predicted affinity in [0, 1].
        target: (B, N, N) uint8 from :func:`tscd.method.affinity_label`.
        counts: optional (n1, n0) to use instead of this batch's counts (gradient accumulation).
    """
    pos = (target == 1).to(pred.dtype)
    neg = (target == 0).to(pred.dtype)
    n1, n0 = (pos.sum(), neg.sum()) if counts is None else counts
    return 0.5 * (pos * (1 - pred)).sum() / (n1 + 1) + 0.5 * (neg * pred).sum() / (n0 + 1)


def equivariance_loss(cam1: torch.Tensor, cam2: torch.Tensor) -> torch.Tensor:
    """``er: grad`` (an extension, docs/method.md 4.6): mean |down(cam1) - cam2| over all C channels, with gradient.

    cam1: (B, C, h1, w1) CAM of view 1; cam2: (B, C, h2, w2) CAM of the downscaled view 2.
    """
    down = F.interpolate(cam1, size=cam2.shape[-2:], mode="bilinear", align_corners=True)
    return (down - cam2).abs().mean()
