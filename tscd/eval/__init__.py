"""Evaluation and inference (docs/method.md 6): metrics, multi-scale inference, random walk, CRF, outputs.

* :mod:`tscd.eval.metrics`: :class:`ConfusionMatrix` (on the device, reduced over ranks) and the mIoU convention.
* :mod:`tscd.eval.inference`: :func:`load_model` (a checkpoint -> TSCDNet), :func:`forward_multi_scale`.
* :mod:`tscd.eval.random_walk`: affinity-refined CAMs (AFA's random walk).
* :mod:`tscd.eval.crf`: dense-CRF post-processing in parallel (needs ``tscd.kernels.dense_crf``).
* :mod:`tscd.eval.evaluator`: :func:`evaluate` (``tscd eval``); :mod:`tscd.eval.predict`: :func:`predict_images`
  (``tscd infer``); :mod:`tscd.eval.export`: :func:`export_pseudo_labels` (``tscd pseudo-labels``).
"""
from tscd.eval.metrics import ConfusionMatrix, segmentation_scores

__all__ = ["ConfusionMatrix", "segmentation_scores"]
