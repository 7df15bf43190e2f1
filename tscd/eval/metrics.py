"""Segmentation metrics from a confusion matrix accumulated on the device (docs/method.md 6).

mIoU convention: IoU_c = TP / (TP + FP + FN); classes with TP + FP + FN = 0 (absent from both the
ground truth and the prediction over the whole dataset) are excluded from the mean. Pixels labelled
255 (IGNORE_INDEX) are ignored.
"""
from __future__ import annotations

import torch

from tscd.constants import IGNORE_INDEX


class ConfusionMatrix:
    """``num_classes x num_classes`` counts (rows: ground truth, columns: prediction), on ``device``."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: `num_classes` must be >= 1; got {num_classes}")
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add (..., H, W) integer predictions and targets (same shape; target may hold 255)."""
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix.update: `pred` {tuple(pred.shape)} and `target` "
                             f"{tuple(target.shape)} must have the same shape")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("ConfusionMatrix.update: `pred` and `target` must be integer label maps")
        pred = pred.to(self.mat.device).reshape(-1).long()
        target = target.to(self.mat.device).reshape(-1).long()
        valid = target != IGNORE_INDEX
        pred, target = pred[valid], target[valid]
        n = self.num_classes
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= n):
            raise ValueError(f"ConfusionMatrix.update: predictions must lie in [0, {n - 1}]; got values in "
                             f"[{int(pred.min())}, {int(pred.max())}]")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n):
            raise ValueError(f"ConfusionMatrix.update: targets must lie in [0, {n - 1}] or be {IGNORE_INDEX}; "
                             f"got values in [{int(target.min())}, {int(target.max())}]")
        self.mat += torch.bincount(target * n + pred, minlength=n * n).view(n, n)

    def all_reduce(self) -> None:
        """Sum the counts over the ranks of the default process group (no-op without one)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.mat)

    def scores(self, class_names: list[str] | None = None) -> dict:
        return segmentation_scores(self.mat, class_names)


def segmentation_scores(mat: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Per-class IoU, mIoU, pixel accuracy and mean class accuracy from a confusion matrix (in %)."""
    m = mat.double().cpu()
    tp = m.diag()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    names = class_names or [str(i) for i in range(m.shape[0])]
    return {
        "miou": 100.0 * float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_acc": 100.0 * float(tp.sum() / m.sum().clamp(min=1)),
        "mean_acc": 100.0 * float(acc[gt > 0].mean()) if (gt > 0).any() else float("nan"),
        "iou": {n: (100.0 * float(v) if present[i] else None) for i, (n, v) in enumerate(zip(names, iou))},
        "convention": "classes absent from both ground truth and prediction are excluded from the mean",
    }
