"""Segmentation metrics from a confusion matrix accumulated on the device (docs/method.md 6), and a run's
validation results as data (``<run_dir>/metrics.jsonl``).

mIoU convention: IoU_c = TP / (TP + FP + FN); classes with TP + FP + FN = 0 (absent from both the
ground truth and the prediction over the whole dataset) are excluded from the mean. Pixels labelled
255 (IGNORE_INDEX) are ignored.

``metrics.jsonl``: each validation of a training run appends one JSON object per line
(:func:`append_metrics`): ``iteration``, ``protocol``, ``split``, ``num_images``, ``source`` (``train``), ``miou``
(output -> mIoU in %) and ``iou`` (output -> class name -> IoU in %, null for a class absent from both ground
truth and prediction). Plots and ``tscd eval`` read it with :func:`read_metrics`; nothing parses log text.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

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


#: The results file of a run directory.
METRICS_FILE = "metrics.jsonl"


def _finite_or_none(v):
    return v if v is None or math.isfinite(v) else None


def append_metrics(run_dir: str | Path, iteration: int, report: dict, split: str, source: str = "train") -> Path:
    """Append one validation (a :func:`tscd.eval.evaluator.evaluate` report) to ``<run_dir>/metrics.jsonl``.

    Returns:
        The file's path.
    """
    results = report["results"]
    record = {"iteration": int(iteration), "protocol": report["protocol"], "split": split,
              "num_images": int(report["num_images"]), "source": source, "time": round(time.time(), 3),
              "miou": {o: _finite_or_none(r["miou"]) for o, r in results.items()},
              "iou": {o: {k: _finite_or_none(v) for k, v in r["iou"].items()} for o, r in results.items()}}
    path = Path(run_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, 2)
        cut = f.tell() > 0 and (f.seek(-1, 2), f.read(1))[1] != b"\n"  # a line cut short by a kill: end it first
        f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode())
    return path


def read_metrics(run_dir_or_file: str | Path, protocol: str | None = None) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (a run directory or the file), oldest iteration first.

    A resumed run may validate an iteration twice: the last record of each (iteration, protocol, source) wins.
    A missing file gives ``[]``; a line that is not JSON (a write cut short by a kill) is skipped.

    Args:
        run_dir_or_file: the run directory or the file itself.
        protocol: keep only the records of this protocol.
    """
    path = Path(run_dir_or_file)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    found: dict[tuple, dict] = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or "iteration" not in record:
            continue
        if protocol is None or record.get("protocol") == protocol:
            found[(record["iteration"], record.get("protocol"), record.get("source"))] = record
    return [found[k] for k in sorted(found, key=lambda k: (k[0], str(k[1]), str(k[2])))]
