"""Turning image files into coloured masks (``tscd infer``).

For each image ``<stem>.<ext>``, written under ``out_dir`` (at the image's own size):

* ``<stem>.png``: the prediction as a palette PNG (values 0..C; VOC colour map, used for COCO too),
* ``overlay/<stem>.png`` (``overlay=True``): the class colours blended into the image,
* ``cam/<stem>.png`` (``cam=True``): the CAM of the classes the classifier predicts (max over them; all classes
  when it predicts none) as a jet heat map over the image,
* ``logits/<stem>.pt`` (``save_logits=True``): the 1/4-resolution logits, float16.

Prediction: the image is resized to ``resize_long``, the segmentation head runs multi-scale + flip over ``scales``
(``(1.0,)`` with ``flip=False`` is single-scale), the logits are upsampled to the image size, optionally refined by
the dense CRF, and the argmax is taken. Images of the same size are batched (up to ``batch_size``). Work is
resumable: an image whose requested outputs all exist is skipped (outputs are written atomically).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tscd.data.io import load_image
from tscd.data.transforms import normalize
from tscd.eval.crf import CRFParams, CRFRunner
from tscd.eval.inference import DEFAULT_RESIZE_LONG, DEFAULT_SEG_SCALES, forward_multi_scale, resize_long
from tscd.eval.outputs import cam_heatmap, colour_overlay, save_mask, save_rgb

logger = logging.getLogger(__name__)

#: File extensions treated as images when a folder is given.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into a list of image files.

    Raises:
        FileNotFoundError: an input does not exist, or a folder holds no image.
        ValueError: no input at all.
    """
    files: list[Path] = []
    inputs = list(inputs)
    if not inputs:
        raise ValueError("infer: give at least one image file or folder")
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise FileNotFoundError(f"infer: folder {path} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"infer: input {path} does not exist")
    stems = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise ValueError(f"infer: two inputs have the same name {f.stem!r} ({stems[f.stem]} and {f}); their "
                             f"outputs would collide")
        stems[f.stem] = f
    return list(dict.fromkeys(files))


def output_paths(out_dir: Path, stem: str, overlay: bool, cam: bool, save_logits: bool) -> list[Path]:
    """The files one image produces (see the module docstring)."""
    paths = [out_dir / f"{stem}.png"]
    if overlay:
        paths.append(out_dir / "overlay" / f"{stem}.png")
    if cam:
        paths.append(out_dir / "cam" / f"{stem}.png")
    if save_logits:
        paths.append(out_dir / "logits" / f"{stem}.pt")
    return paths


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                   device: torch.device | str = "cpu", scales: Sequence[float] = DEFAULT_SEG_SCALES,
                   flip: bool = True, resize_long_side: int | None = DEFAULT_RESIZE_LONG, crf: bool = False,
                   crf_params: CRFParams = CRFParams(), crf_workers: int = 2, overlay: bool = False,
                   cam: bool = False, cam_scales: Sequence[float] = (1.0, 0.5, 1.5), save_logits: bool = False,
                   batch_size: int = 1, overwrite: bool = False, progress: bool = True) -> dict:
    """Predict masks for image files (module docstring).

    Args:
        model: a :class:`~tscd.models.TSCDNet` (put in eval mode here).
        images: image files.
        out_dir: output folder.
        device: where to run.
        scales, flip, resize_long_side: multi-scale test settings.
        crf, crf_params, crf_workers: dense-CRF post-processing.
        overlay, cam, save_logits: extra outputs.
        cam_scales: CAM scales for the heat maps.
        batch_size: images of equal size per forward.
        overwrite: recompute images whose outputs exist.
        progress: show a tqdm bar.

    Returns:
        ``{"written": n, "skipped": n}``.

    Raises:
        RuntimeError: ``crf`` without the dense CRF available.
        FileNotFoundError, DataError: unreadable image (names the file).
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    model.eval()
    todo = []
    for path in images:
        path = Path(path)
        if not overwrite and all(p.is_file() for p in output_paths(out_dir, path.stem, overlay, cam, save_logits)):
            continue
        todo.append(path)
    skipped = len(images) - len(todo)
    if skipped:
        logger.info("infer: %d of %d images already done in %s (skipped; --overwrite recomputes)", skipped,
                    len(images), out_dir)
    runner = CRFRunner(crf_params, crf_workers) if crf else None

    def finish(probs_or_logits: torch.Tensor, arr: np.ndarray, stem: str) -> None:
        pred = probs_or_logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        save_mask(pred, out_dir / f"{stem}.png")
        if overlay:
            save_rgb(colour_overlay(arr, pred), out_dir / "overlay" / f"{stem}.png")

    bar = tqdm(total=len(todo), desc="infer", disable=None if progress else True, dynamic_ncols=True)
    try:
        i = 0
        while i < len(todo):
            arrs = [load_image(todo[i])]
            j = i + 1
            while j < len(todo) and len(arrs) < batch_size:  # batch consecutive images of the same size
                nxt = load_image(todo[j])
                if nxt.shape != arrs[0].shape:
                    break
                arrs.append(nxt)
                j += 1
            batch = todo[i:j]
            i = j
            img = torch.stack([normalize(a) for a in arrs]).to(device, non_blocking=True)
            size = tuple(img.shape[-2:])
            x = resize_long(img, resize_long_side)
            out = forward_multi_scale(model, x, seg_scales=scales, cam_scales=cam_scales if cam else None, flip=flip)
            logits = F.interpolate(out.seg_ms.float(), size=size, mode="bilinear", align_corners=False)
            if cam:
                cams = F.interpolate(out.cam, size=size, mode="bilinear", align_corners=False)
                present = out.cls_logits > 0
                present[~present.any(1)] = True
                heat = cams.masked_fill(~present[:, :, None, None], 0).amax(1).cpu().numpy()
            for k, (path, arr) in enumerate(zip(batch, arrs)):
                stem = path.stem
                if save_logits:
                    (out_dir / "logits").mkdir(parents=True, exist_ok=True)
                    tmp = out_dir / "logits" / f".{stem}.pt.tmp"
                    torch.save(out.seg_ms[k].half().cpu(), tmp)
                    os.replace(tmp, out_dir / "logits" / f"{stem}.pt")
                if cam:
                    save_rgb(cam_heatmap(arr, heat[k]), out_dir / "cam" / f"{stem}.png")
                if runner is not None:
                    image255 = torch.from_numpy(arr).permute(2, 0, 1)[None].float().to(device)
                    runner.submit(image255, logits[k:k + 1].softmax(1),
                                  lambda p, arr=arr, stem=stem: finish(p, arr, stem))
                else:
                    finish(logits[k:k + 1], arr, stem)
            bar.update(len(batch))
        if runner is not None:
            runner.close()
            runner = None
    finally:
        bar.close()
        if runner is not None and runner.pool is not None:
            runner.pool.shutdown(wait=False, cancel_futures=True)
    return {"written": len(todo), "skipped": skipped}
