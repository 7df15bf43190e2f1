"""COCO 2014 as a semantic-segmentation set with image-level labels.

Layout under ``root`` (the standard download)::

    train2014/COCO_train2014_<12 digits>.jpg, val2014/...      images
    annotations/instances_{train,val}2014.json                instance annotations
    SegmentationClass/{train2014,val2014}/<name>.png          written by `tscd data coco`
    splits/{train,val}.txt, cls_labels.json                   written by `tscd data coco`

Mask generation (:func:`prepare_coco`), per image, with pycocotools (polygons, uncompressed and
compressed RLE):

1. start from 0 (background);
2. paint every crowd region (``iscrowd=1``) with 255 (ignore);
3. paint the non-crowd instances from the largest to the smallest (pixel area of the decoded mask;
   ties by annotation id), each overwriting what is below it, so small objects lying on large ones
   stay visible and a labelled object inside a crowd region keeps its label;
4. category ids 1..90 are remapped to the contiguous classes 1..80 (``COCO_ID_TO_CLASS``).

The class vector of an image marks the classes present in its final mask. Split ``train`` = the
images of ``instances_train2014.json`` with at least one non-crowd annotation; ``val`` = the images
of ``instances_val2014.json`` with at least one annotation (an image with crowd regions only has an
empty class vector; that is allowed for evaluation). Masks are written once, as palette PNGs, with
a progress bar and ``workers`` processes; existing outputs are skipped (the run is resumable, each
file is written atomically).
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from tscd.constants import IGNORE_INDEX
from tscd.data.classes import COCO_CLASSES, COCO_ID_TO_CLASS
from tscd.data.io import (
    CLS_LABELS_FILE,
    SPLITS_DIR,
    DataError,
    load_mask,
    read_cls_labels,
    require_dir,
    save_mask,
    write_cls_labels,
    write_split_list,
)
from tscd.data.report import Report
from tscd.data.voc import VOCDataset, check_image_sample

log = logging.getLogger(__name__)

COCO_MASK_DIR = "SegmentationClass"
COCO_SPLITS: tuple[str, ...] = ("train", "val")


def coco_year_dir(split: str, year: str = "2014") -> str:
    """Folder name of a split's images (and masks): ``train`` -> ``train2014``."""
    return f"{split}{year}"


def annotation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode one COCO ``segmentation`` (polygon list, uncompressed RLE or compressed RLE).

    Returns:
        uint8 (H, W) binary mask.

    Raises:
        DataError: the segmentation has none of the three formats.
    """
    from pycocotools import mask as mask_utils  # imported here: only mask generation needs it

    if isinstance(segmentation, list):  # polygons
        if not segmentation:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:  # compressed RLE
            rle = dict(segmentation)
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise DataError(f"unknown COCO segmentation format: {str(segmentation)[:80]!r}")
    with warnings.catch_warnings():  # pycocotools' own numpy-2 DeprecationWarning (copy keyword)
        warnings.simplefilter("ignore", DeprecationWarning)
        m = mask_utils.decode(rle)
    if m.ndim == 3:
        m = m.max(axis=2)
    return m.astype(np.uint8)


def render_mask(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """Semantic mask of one image from its instance annotations (rule in the module docstring).

    Args:
        annotations: COCO annotation dicts (``segmentation``, ``category_id``, ``iscrowd``, ``id``).
        height, width: image size.

    Returns:
        uint8 (H, W): 0 background, 1..80 classes, 255 crowd.

    Raises:
        DataError: an unknown category id or segmentation format.
    """
    out = np.zeros((height, width), dtype=np.uint8)
    instances = []
    for ann in annotations:
        cat = int(ann["category_id"])
        if cat not in COCO_ID_TO_CLASS:
            raise DataError(f"annotation {ann.get('id')}: category id {cat} is not one of the 80 COCO categories")
        m = annotation_to_mask(ann["segmentation"], height, width).astype(bool)
        if ann.get("iscrowd", 0):
            out[m] = IGNORE_INDEX
        else:
            instances.append((int(m.sum()), int(ann.get("id", 0)), COCO_ID_TO_CLASS[cat], m))
    instances.sort(key=lambda t: (-t[0], t[1]))  # largest first, so smaller ones are painted on top
    for _, _, cls, m in instances:
        out[m] = cls
    return out


def _render_one(task: tuple[str, int, int, list[dict]]) -> tuple[str, list[int] | None, str | None, bool]:
    """Worker: write (or reuse) one mask; -> (output path, present classes, error, written)."""
    out_path, height, width, anns = task
    try:
        if os.path.isfile(out_path):
            mask, written = load_mask(out_path, len(COCO_CLASSES) - 1, image_size=(height, width)), False
        else:
            mask, written = render_mask(anns, height, width), True
            save_mask(mask, out_path)
    except (DataError, OSError, ValueError) as exc:
        return out_path, None, f"{out_path}: {exc}", False
    present = np.flatnonzero(np.bincount(mask.reshape(-1), minlength=256)[1:len(COCO_CLASSES)]) + 1
    return out_path, [int(c) for c in present], None, written


def load_instances(path: Path) -> tuple[list[dict], dict[int, list[dict]]]:
    """Read an instances JSON: (images, image id -> annotations)."""
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist (expected the standard "
                                "annotations/instances_{train,val}2014.json)")
    try:
        data = json.loads(path.read_text())
        images = data["images"]
        by_image: dict[int, list[dict]] = defaultdict(list)
        for ann in data["annotations"]:
            by_image[int(ann["image_id"])].append(ann)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"COCO annotation file {path}: not a valid instances JSON ({exc!r})") from exc
    return images, by_image


def prepare_coco(root: str | os.PathLike, workers: int = 1, splits: Sequence[str] = COCO_SPLITS,
                 year: str = "2014", check_images: int = 100) -> Report:
    """Write COCO masks, split lists and class vectors (``tscd data coco``); rules in the module docstring.

    Args:
        root: COCO root (holds ``annotations/``, ``train2014/``, ``val2014/``).
        workers: processes that render masks.
        splits: which of ``train``, ``val`` to prepare.
        year: ``2014`` (``2017`` works the same way with ``instances_*2017.json``).
        check_images: how many listed images to decode fully (-1: all).

    Returns:
        The report (``report.ok`` is False if any mask failed or images are missing).

    Raises:
        FileNotFoundError: missing root or annotation file.
    """
    root = require_dir(root, "COCO `root`")
    report = Report(f"COCO {year} data at {root}")
    all_labels: dict[str, list[int]] = {}
    cls_path = root / CLS_LABELS_FILE
    if cls_path.is_file():  # keep the vectors of splits not prepared in this run
        _, all_labels = read_cls_labels(cls_path)
    for split in splits:
        if split not in COCO_SPLITS:
            raise ValueError(f"prepare_coco: `splits` must be among {COCO_SPLITS}; got {split!r}")
        ydir = coco_year_dir(split, year)
        images, by_image = load_instances(root / "annotations" / f"instances_{ydir}.json")
        img_dir = root / ydir
        mask_dir = root / COCO_MASK_DIR / ydir
        keep = []
        for info in images:
            anns = by_image.get(int(info["id"]), [])
            non_crowd = [a for a in anns if not a.get("iscrowd", 0)]
            if (non_crowd if split == "train" else anns):
                keep.append((info, anns))
        report.info(f"{split}: {len(images)} images in the JSON, {len(keep)} listed "
                    f"({'>= 1 non-crowd' if split == 'train' else '>= 1'} annotation)")
        missing = [info["file_name"] for info, _ in keep if not (img_dir / info["file_name"]).is_file()]
        for name in missing[:50]:
            report.error(f"{split}: image {img_dir / name} (in the JSON) does not exist")
        if len(missing) > 50:
            report.error(f"{split}: ... and {len(missing) - 50} more missing images")
        tasks = [(str(mask_dir / (Path(info["file_name"]).stem + ".png")), int(info["height"]), int(info["width"]),
                  anns) for info, anns in keep]
        mask_dir.mkdir(parents=True, exist_ok=True)
        results = []
        if workers > 1 and len(tasks) > 1:
            with mp.get_context().Pool(workers) as pool:
                it = pool.imap(_render_one, tasks, chunksize=16)
                results = list(tqdm(it, total=len(tasks), desc=f"COCO {split} masks", disable=None))
        else:
            results = [_render_one(t) for t in tqdm(tasks, desc=f"COCO {split} masks", disable=None)]
        ids, written = [], 0
        for out_path, classes, err, was_written in results:
            if err is not None:
                report.error(err)
                continue
            name = Path(out_path).stem
            all_labels[name] = classes
            ids.append(name)
            written += was_written
        report.info(f"{split}: {written} mask(s) written, {len(ids) - written} already present -> {mask_dir}")
        empty = [i for i in ids if not all_labels[i]]
        if empty:
            report.info(f"{split}: {len(empty)} image(s) with an empty class vector (crowd only or fully covered)")
        write_split_list(root / SPLITS_DIR / f"{split}.txt", ids)
        report.info(f"split {split}: {len(ids)} ids -> {root / SPLITS_DIR / (split + '.txt')}")
        check_image_sample(report, [img_dir / (i + ".jpg") for i in ids if (img_dir / (i + ".jpg")).is_file()],
                           check_images)
    write_cls_labels(cls_path, COCO_CLASSES, all_labels)
    report.info(f"class vectors of {len(all_labels)} images -> {cls_path}")
    return report


class COCODataset(VOCDataset):
    """COCO prepared by :func:`prepare_coco`: images in ``<split>2014/``, masks in
    ``SegmentationClass/<split>2014/``, lists in ``splits/``, vectors in ``cls_labels.json``.

    Args:
        root: COCO root.
        split: ``train`` or ``val``.
        train, crop_size, transform, skip_bad, allow_empty_labels: see :class:`VOCDataset`.
        year: ``2014`` by default.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", train: bool = False, crop_size: int = 512,
                 *, year: str = "2014", transform: Callable | None = None, skip_bad: bool = False,
                 allow_empty_labels: bool | None = None) -> None:
        ydir = coco_year_dir(split, year)
        root_p = require_dir(root, "COCODataset `root`")
        split_file = root_p / SPLITS_DIR / f"{split}.txt"
        if not split_file.is_file() or not (root_p / CLS_LABELS_FILE).is_file():
            raise FileNotFoundError(f"COCO split list {split_file} or class-vector file {root_p / CLS_LABELS_FILE} "
                                    f"does not exist; create them with `tscd data coco --root {root_p}`")
        super().__init__(root_p, split, train, crop_size, split_file=split_file, image_dir=ydir,
                         mask_dir=f"{COCO_MASK_DIR}/{ydir}", transform=transform, skip_bad=skip_bad,
                         allow_empty_labels=allow_empty_labels)
