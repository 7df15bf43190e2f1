"""Evaluation: metrics (confusion matrix, mIoU)."""
from tscd.eval.metrics import ConfusionMatrix, segmentation_scores

__all__ = ["ConfusionMatrix", "segmentation_scores"]
