"""Evaluation and inference (docs/method.md 6): metrics, multi-scale inference, CRF, outputs (the label logic, random
walk included, is in :mod:`tscd.method`).

* :mod:`tscd.eval.metrics`: :class:`ConfusionMatrix` (on the device, reduced over ranks) and the mIoU convention.
* :mod:`tscd.eval.inference`: :func:`load_model` (a checkpoint -> TSCDNet), :func:`forward_multi_scale`.
* :mod:`tscd.eval.crf`: dense-CRF post-processing in parallel (needs ``tscd.kernels.dense_crf``).
* :mod:`tscd.eval.evaluator`: :func:`evaluate` (``tscd eval``); :mod:`tscd.eval.predict`: :func:`predict_images`
  (``tscd infer``); :mod:`tscd.eval.export`: :func:`export_pseudo_labels` (``tscd pseudo-labels``).
"""
from tscd.eval.metrics import ConfusionMatrix, segmentation_scores

__all__ = ["ConfusionMatrix", "segmentation_scores"]
