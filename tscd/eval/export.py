"""Exporting the refined pseudo labels of a split as palette PNGs (``tscd pseudo-labels``), docs/method.md 3.

For users who train a second-stage segmenter (e.g. DeepLab) on TSCD's pseudo labels. Each image, at its native size:
multi-scale CAM (:func:`tscd.models.multi_scale_cam`, scales of ``pseudo.cam_scales``) with the image-level labels,
then VARM refinement with two background thresholds (:func:`tscd.method.refine_cams_with_bkg`): values
0 (background), 1..C, and 255 where the refinement is uncertain. Written atomically to ``<out>/<name>.png``;
existing files are skipped (resumable). If the split has masks, the labels are also scored (255 scored as
background, as in training-time validation).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

from tscd.constants import IGNORE_INDEX
from tscd.data import denormalize
from tscd.eval.metrics import ConfusionMatrix
from tscd.eval.outputs import save_mask
from tscd.method.labels import refine_cams_with_bkg
from tscd.models import multi_scale_cam

logger = logging.getLogger(__name__)


@torch.no_grad()
def export_pseudo_labels(model: torch.nn.Module, dataset: torch.utils.data.Dataset, out_dir: str | os.PathLike, *,
                         cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5), refine: dict | None = None,
                         device: torch.device | str = "cpu", num_images: int | None = None,
                         overwrite: bool = False, progress: bool = True) -> dict:
    """Write ``<out_dir>/<name>.png`` pseudo labels for every image of ``dataset`` (module docstring).

    Args:
        model: a :class:`~tscd.models.TSCDNet` (put in eval mode here).
        dataset: an evaluation dataset (native size, with ``cls_label``).
        out_dir: output folder.
        cam_scales: CAM scales.
        refine: keyword arguments of ``refine_cams_with_bkg`` (bkg_high, bkg_low, scale, mode, num_iter, dilations,
            backend).
        device: where to run.
        num_images: the first N images only.
        overwrite: recompute existing files.
        progress: show a tqdm bar.

    Returns:
        ``{"written": n, "skipped": n, "ignored_fraction": f, "scores": segmentation_scores or None}`` (the
        fraction of 255 pixels and the scores cover the images written in this run).
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    refine = dict(refine or {})
    model.eval()
    total = len(dataset) if num_images is None else min(num_images, len(dataset))
    mat = ConfusionMatrix(int(dataset.num_classes) + 1, device)
    written = skipped = scored = 0
    ignored = pixels = 0
    for i in tqdm(range(total), desc="pseudo labels", disable=None if progress else True, dynamic_ncols=True):
        name = dataset.name_of(i) if hasattr(dataset, "name_of") else None
        if name is not None and not overwrite and (out_dir / f"{name}.png").is_file():
            skipped += 1
            continue
        item = dataset[i]
        name = item["name"]
        img = item["img"].unsqueeze(0).to(device, non_blocking=True)
        cls_label = item["cls_label"].unsqueeze(0).to(device, non_blocking=True)
        cams = multi_scale_cam(model, img, cam_scales)
        label = refine_cams_with_bkg(denormalize(img.float()), cams, cls_label, None, **refine)
        ignored += int((label == IGNORE_INDEX).sum())
        pixels += label.numel()
        if item.get("label") is not None:
            gt = item["label"].unsqueeze(0).to(device)
            mat.update(label.masked_fill(label == IGNORE_INDEX, 0), gt)
            scored += 1
        save_mask(label[0].to(torch.uint8).cpu().numpy(), out_dir / f"{name}.png")
        written += 1
    scores = mat.scores(list(getattr(dataset, "class_names", [])) or None) if scored else None
    return {"written": written, "skipped": skipped, "ignored_fraction": ignored / pixels if pixels else 0.0,
            "scores": scores}
