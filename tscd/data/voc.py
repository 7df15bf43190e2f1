"""PASCAL VOC 2012 (+ SBD "aug" masks), and any folder in the same layout (the demo set on disk).

Layout under ``root`` (the ``VOC2012`` folder of the standard download, with SBD's
``SegmentationClassAug`` added)::

    JPEGImages/<id>.jpg                  images (.png etc. also accepted)
    SegmentationClassAug/<id>.png        masks: palette PNG, values 0..20 and 255 (ignore)
    ImageSets/Segmentation/{train,val}.txt   official lists (read if present)
    splits/<split>.txt                   written by `tscd data voc`: train_aug, train, val
    cls_labels.json                      written by `tscd data voc`: class vectors (see tscd.data.io)

``tscd data voc --root DIR`` (:func:`prepare_voc`) writes the split lists and class vectors:
``val`` and ``train`` are copied from ``ImageSets/Segmentation`` when present;
``train_aug`` = every id with a mask in ``SegmentationClassAug`` and an image, minus ``val``
(10,582 ids for the standard VOC + SBD download). The class vector of an image marks the classes
1..20 present in its mask. It also checks the tree and returns a :class:`Report`.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from tscd.data.base import Sample, SegmentationDataset
from tscd.data.classes import VOC_CLASSES
from tscd.data.io import (
    CLS_LABELS_FILE,
    SPLITS_DIR,
    DataError,
    find_image,
    load_image,
    load_mask,
    multi_hot,
    read_cls_labels,
    read_split_list,
    require_dir,
    write_cls_labels,
    write_split_list,
)
from tscd.data.report import Report

log = logging.getLogger(__name__)

VOC_IMAGE_DIR = "JPEGImages"
VOC_MASK_DIR = "SegmentationClassAug"
VOC_SPLITS: tuple[str, ...] = ("train_aug", "train", "val")


def find_split_file(root: Path, split: str) -> Path:
    """``root/splits/<split>.txt``, else ``root/ImageSets/Segmentation/<split>.txt``.

    Raises:
        FileNotFoundError: neither exists (the message says how to create them).
    """
    candidates = [root / SPLITS_DIR / f"{split}.txt", root / "ImageSets" / "Segmentation" / f"{split}.txt"]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"split list for split {split!r} not found: looked for "
                            f"{', '.join(str(c) for c in candidates)}; create it with `tscd data voc --root {root}` "
                            "(or `tscd data coco` / `tscd data demo` for those datasets)")


class VOCDataset(SegmentationDataset):
    """VOC 2012 with SBD masks, or any folder in the VOC layout (see the module docstring).

    Class names come from ``cls_labels.json`` (so the demo set on disk, with 5 classes, reads the
    same way); VOC's 20 classes are the fallback.

    Args:
        root: dataset root.
        split: split name (``train_aug``, ``train``, ``val``; any ``splits/<name>.txt``).
        train: training mode (random augmentation, non-empty class vectors required).
        crop_size: crop of the default training transform.
        split_file: explicit split list, instead of looking it up by ``split``.
        image_dir, mask_dir: sub-folders of ``root``; ``mask_dir=None`` means no masks. Masks are
            used when the folder exists.
        transform, skip_bad, allow_empty_labels: see :class:`SegmentationDataset`.

    Raises:
        FileNotFoundError: missing root, image folder, split list or class-vector file.
        DataError: bad entries (unless ``skip_bad``).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train_aug", train: bool = False, crop_size: int = 512,
                 *, split_file: str | os.PathLike | None = None, image_dir: str = VOC_IMAGE_DIR,
                 mask_dir: str | None = VOC_MASK_DIR, transform: Callable | None = None, skip_bad: bool = False,
                 allow_empty_labels: bool | None = None) -> None:
        root = require_dir(root, f"{type(self).__name__} `root`")
        img_dir = require_dir(root / image_dir, f"{type(self).__name__} image folder")
        msk_dir = root / mask_dir if mask_dir is not None else None
        if msk_dir is not None and not msk_dir.is_dir():
            log.info("%s: no mask folder %s; items will have no `label`", root, msk_dir)
            msk_dir = None
        list_path = Path(split_file) if split_file is not None else find_split_file(root, split)
        ids = read_split_list(list_path)
        cls_path = root / CLS_LABELS_FILE
        if not cls_path.is_file():
            raise FileNotFoundError(f"class-vector file {cls_path} does not exist; create it with "
                                    f"`tscd data voc --root {root}`")
        class_names, labels = read_cls_labels(cls_path)
        self.root, self.split, self.split_file = root, split, list_path
        samples = []
        missing_label = []
        for name in ids:
            image_path = find_image(img_dir, name) or img_dir / f"{name}.jpg"
            mask_path = msk_dir / f"{name}.png" if msk_dir is not None else None
            if name not in labels:
                missing_label.append(name)
                cls_label = np.zeros(0, dtype=np.float32)  # wrong shape: reported by the base class
            else:
                cls_label = multi_hot(labels[name], len(class_names) - 1)
            samples.append(Sample(name, image_path, mask_path, cls_label))
        if missing_label:
            msg = (f"{len(missing_label)} id(s) of {list_path} have no class vector in {cls_path} "
                   f"(first: {missing_label[:3]}); regenerate it with `tscd data voc --root {root}`")
            if not skip_bad:
                raise DataError(msg)
            log.warning(msg)
        super().__init__(samples, class_names, train=train, transform=transform, crop_size=crop_size,
                         skip_bad=skip_bad, allow_empty_labels=allow_empty_labels, check_mask_labels=True,
                         source=f"{list_path}")


# ---------------------------------------------------------------------- preparation


def _scan_one(task: tuple[str, str, str | None, int]) -> tuple[str, list[int] | None, str | None]:
    """Worker: read one mask, check it against its image's size; -> (id, classes, error)."""
    name, mask_path, image_path, num_classes = task
    try:
        size = None
        if image_path is not None:
            try:
                with Image.open(image_path) as im:  # header only: cheap
                    size = (im.height, im.width)
            except (OSError, SyntaxError) as exc:
                return name, None, f"image file {image_path} cannot be opened: {exc}"
        mask = load_mask(mask_path, num_classes, image_size=size)
    except (DataError, OSError) as exc:
        return name, None, str(exc)
    present = np.flatnonzero(np.bincount(mask.reshape(-1), minlength=256)[1:num_classes + 1]) + 1
    return name, [int(c) for c in present], None


def scan_masks(tasks: Sequence[tuple[str, str, str | None, int]], workers: int = 1, desc: str = "masks"
               ) -> list[tuple[str, list[int] | None, str | None]]:
    """Run :func:`_scan_one` over many masks (in ``workers`` processes), with a progress bar."""
    if workers > 1 and len(tasks) > 1:
        with mp.get_context().Pool(workers) as pool:
            return list(tqdm(pool.imap(_scan_one, tasks, chunksize=64), total=len(tasks), desc=desc,
                             disable=None))
    return [_scan_one(t) for t in tqdm(tasks, desc=desc, disable=None)]


def check_image_sample(report: Report, paths: Sequence[Path], num: int, seed: int = 0) -> None:
    """Fully decode ``num`` images chosen at random (all if ``num < 0``); errors go to ``report``."""
    paths = list(paths)
    if num >= 0 and num < len(paths):
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), size=num, replace=False))]
    bad = 0
    for p in tqdm(paths, desc="decode images", disable=None):
        try:
            load_image(p)
        except (DataError, OSError) as exc:
            report.error(str(exc))
            bad += 1
    report.info(f"decoded {len(paths)} image(s) fully: {bad} bad")


def prepare_folder(root: str | os.PathLike, class_names: Sequence[str], *, image_dir: str = VOC_IMAGE_DIR,
                   mask_dir: str = VOC_MASK_DIR, workers: int = 1, check_images: int = 100,
                   title: str = "VOC") -> Report:
    """Write split lists and class vectors of a VOC-layout folder and check it (see :func:`prepare_voc`)."""
    root = require_dir(root, f"{title} `root`")
    img_dir = require_dir(root / image_dir, f"{title} image folder")
    msk_dir = require_dir(root / mask_dir, f"{title} mask folder")
    num_classes = len(class_names) - 1
    report = Report(f"{title} data at {root}")
    image_paths = {p.stem: p for p in sorted(img_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}
    mask_ids = sorted(p.stem for p in msk_dir.glob("*.png") if not p.name.startswith("."))
    report.info(f"images in {image_dir}/: {len(image_paths)}; masks in {mask_dir}/: {len(mask_ids)}")
    no_image = [m for m in mask_ids if m not in image_paths]
    for m in no_image:
        report.error(f"mask {msk_dir / (m + '.png')} has no image in {img_dir}")
    tasks = [(m, str(msk_dir / f"{m}.png"), str(image_paths[m]), num_classes) for m in mask_ids if m in image_paths]
    labels: dict[str, list[int]] = {}
    for name, classes, err in scan_masks(tasks, workers, desc=f"{title} masks"):
        if err is not None:
            report.error(err)
        else:
            labels[name] = classes
    empty = sorted(n for n, c in labels.items() if not c)
    if empty:
        report.warn(f"{len(empty)} mask(s) contain no foreground class (first: {empty[:5]}); they are kept in the "
                    "lists, and a training dataset rejects them unless data.skip_bad=true")
    # Split lists.
    official = root / "ImageSets" / "Segmentation"
    splits: dict[str, list[str]] = {}
    for split in ("train", "val"):
        path = official / f"{split}.txt"
        if path.is_file():
            ids = read_split_list(path)
            bad = [i for i in ids if i not in labels]
            for i in bad[:50]:
                report.error(f"{path}: id {i!r} has no usable image + mask (missing or bad)")
            if len(bad) > 50:
                report.error(f"{path}: ... {len(bad) - 50} more ids without a usable image + mask")
            splits[split] = ids
    if "val" not in splits:
        report.warn(f"no official val list ({official / 'val.txt'}): train_aug = all masks, no val split written")
    val = set(splits.get("val", ()))
    splits = {"train_aug": [i for i in sorted(labels) if i not in val], **splits}
    out_dir = root / SPLITS_DIR
    for split, ids in splits.items():
        write_split_list(out_dir / f"{split}.txt", ids)
        report.info(f"split {split}: {len(ids)} ids -> {out_dir / (split + '.txt')}")
    write_cls_labels(root / CLS_LABELS_FILE, class_names, labels)
    report.info(f"class vectors of {len(labels)} images -> {root / CLS_LABELS_FILE}")
    counts = np.zeros(num_classes + 1, dtype=np.int64)
    for classes in labels.values():
        counts[classes] += 1
    report.info("images per class: " + ", ".join(f"{class_names[k]} {counts[k]}" for k in range(1, num_classes + 1)))
    check_image_sample(report, [image_paths[i] for i in sorted(labels)], check_images)
    return report


def prepare_voc(root: str | os.PathLike, workers: int = 1, check_images: int = 100) -> Report:
    """Write VOC's split lists and class vectors, and check the tree (``tscd data voc``).

    Reads every mask in ``SegmentationClassAug`` (legal values 0..20 and 255, size equal to the
    image's), derives each image's class vector from its mask, writes ``splits/{train_aug,train,val}.txt``
    and ``cls_labels.json`` (see the module docstring for the rules), and decodes ``check_images``
    randomly chosen images fully (-1: all).

    Args:
        root: the ``VOC2012`` folder.
        workers: processes used to read the masks.
        check_images: how many images to decode fully (-1 for all).

    Returns:
        The report; ``report.ok`` is False when any file is bad (bad masks are left out of the lists).

    Raises:
        FileNotFoundError: ``root``, ``JPEGImages`` or ``SegmentationClassAug`` is missing.
    """
    return prepare_folder(root, VOC_CLASSES, workers=workers, check_images=check_images, title="VOC")

