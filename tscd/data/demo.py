"""A procedurally generated demo set: no download, deterministic, learnable on a CPU in minutes.

Each image (``size x size``, default 96) shows 1 to 3 objects on a textured background. There are 5
classes, each a shape with its own colour family:

====  ========  =====================================  ==============
 k    class     shape                                  colour (hue)
====  ========  =====================================  ==============
 1    disc      filled circle                          red
 2    square    filled square, random rotation          green
 3    triangle  filled equilateral triangle, rotated    blue
 4    ring      annulus (inner radius 0.55 r)            yellow/orange
 5    cross     plus sign (arm width 0.6 r), rotated     magenta
====  ========  =====================================  ==============

Object radius ``r ~ U(0.12, 0.28) * size``; saturation and brightness vary per object, a stripe or
noise texture modulates it, and the background is a smooth random colour field (desaturated) with
pixel noise, so neither a single colour nor a single edge gives the class away trivially, but the
task stays easy enough for a small network to learn in a few hundred iterations. A new object
overlaps the foreground painted so far by less than 20 % of its own area (rejection sampling), and
later objects are painted on top. The mask holds 0 (background) and 1..5 (no ignore pixels); the
class vector marks the classes present in the mask.

Item ``i`` of split ``s`` is a function of ``(seed, s, i)`` only. :class:`DemoDataset` generates
items on the fly; :func:`write_demo` (``tscd data demo --out DIR``) writes the same images (lossless
PNG, in ``JPEGImages/``) and masks in the VOC layout, which :class:`tscd.data.voc.VOCDataset` reads.
"""
from __future__ import annotations

import colorsys
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from tqdm import tqdm

from tscd.data.base import SegmentationDataset, make_transform
from tscd.data.classes import DEMO_CLASSES, PALETTE
from tscd.data.io import CLS_LABELS_FILE, SPLITS_DIR, classes_in_mask, save_mask, write_cls_labels, write_split_list
from tscd.data.report import Report
from tscd.data.voc import VOC_IMAGE_DIR, VOC_MASK_DIR

log = logging.getLogger(__name__)

DEMO_SPLITS: dict[str, int] = {"train": 0, "val": 1}
#: Hue (0..1) at the centre of each class's colour family, and the half-width of the family.
_HUES = {1: 0.0, 2: 0.33, 3: 0.62, 4: 0.12, 5: 0.83}
_HUE_SPREAD = 0.04
_MAX_OVERLAP = 0.2
#: A :class:`DemoDataset` keeps its generated items in memory when they take at most this much (the default
#: train split: 1000 items of 96 px, 35 MiB).
DEMO_CACHE_MIB = 256


def _shape_mask(cls: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float
                ) -> np.ndarray:
    """Boolean mask of one shape of class ``cls`` centred at (cy, cx) with radius r."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    d = np.hypot(dx, dy)
    if cls == 1:  # disc
        return d <= r
    if cls == 2:  # square
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if cls == 3:  # equilateral triangle with circumradius r
        inside = np.ones_like(d, dtype=bool)
        for k in range(3):
            a = angle + np.pi / 2 + k * 2 * np.pi / 3  # outward normal of an edge
            inside &= (np.cos(a) * dx + np.sin(a) * dy) <= 0.5 * r
        return inside
    if cls == 4:  # ring
        return (d <= r) & (d >= 0.55 * r)
    if cls == 5:  # cross
        return ((np.abs(u) <= r) & (np.abs(v) <= 0.3 * r)) | ((np.abs(v) <= r) & (np.abs(u) <= 0.3 * r))
    raise ValueError(f"demo: unknown class {cls}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random colour field (bilinear upsampling of a coarse grid) plus pixel noise, float (S, S, 3)."""
    grid = int(rng.integers(3, 7))
    base = _hsv(rng.random(), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.75))
    coarse = np.clip(base + rng.normal(0.0, 30.0, size=(grid, grid, 3)), 0, 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return field + rng.normal(0.0, 8.0, size=(size, size, 3))


def generate_demo_image(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """Draw one demo image and its mask.

    Args:
        rng: the generator (consumed).
        size: side of the square image.

    Returns:
        (img uint8 (size, size, 3), mask uint8 (size, size) with values 0..5).
    """
    img = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    num_objects = int(rng.integers(1, 4))
    for obj in range(num_objects):
        cls = int(rng.integers(1, len(DEMO_CLASSES)))
        for _ in range(20):
            r = float(rng.uniform(0.12, 0.28)) * size
            cy, cx = rng.uniform(0.6 * r, size - 0.6 * r, size=2)
            shape = _shape_mask(cls, yy, xx, float(cy), float(cx), r, float(rng.uniform(0, 2 * np.pi)))
            area = int(shape.sum())
            if area >= 12 and (mask[shape] > 0).sum() < _MAX_OVERLAP * area:
                break
        else:
            continue  # no room for this object: leave it out (the first object always fits)
        colour = _hsv(_HUES[cls] + rng.uniform(-_HUE_SPREAD, _HUE_SPREAD), rng.uniform(0.55, 1.0),
                      rng.uniform(0.6, 1.0))
        if rng.random() < 0.5:  # stripes
            period, phase, direction = rng.uniform(4, 10), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
            t = np.cos(direction) * xx + np.sin(direction) * yy
            texture = 1.0 + 0.15 * np.sin(2 * np.pi * t / period + phase)
        else:  # speckle
            texture = 1.0 + rng.normal(0.0, 0.08, size=(size, size))
        img[shape] = colour * texture[shape][:, None]
        mask[shape] = cls
    img = np.clip(img + rng.normal(0.0, 4.0, size=img.shape), 0, 255).astype(np.uint8)
    return img, mask


def demo_item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of demo item ``index`` of ``split``: a function of (seed, split, index) only."""
    if split not in DEMO_SPLITS:
        raise ValueError(f"demo: `split` must be one of {sorted(DEMO_SPLITS)}; got {split!r}")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xDE70, DEMO_SPLITS[split], int(index)])


def demo_name(split: str, index: int) -> str:
    """Image id of a demo item, e.g. ``demo_train_00012``."""
    return f"demo_{split}_{index:05d}"


class DemoDataset(SegmentationDataset):
    """The demo set, generated on the fly (module docstring); same items as :func:`write_demo` writes.

    Args:
        split: ``train`` or ``val``.
        num_images: number of items (default 1000 for train, 100 for val).
        size: image side in pixels.
        seed: generation seed (the augmentation seed comes from the loader).
        train: training mode; default ``split == "train"``.
        crop_size: crop of the training transform; default ``size``.
        transform: overrides the default transform.
    """

    def __init__(self, split: str = "train", num_images: int | None = None, size: int = 96, seed: int = 0, *,
                 train: bool | None = None, crop_size: int | None = None, transform: Callable | None = None) -> None:
        if split not in DEMO_SPLITS:
            raise ValueError(f"DemoDataset: `split` must be one of {sorted(DEMO_SPLITS)}; got {split!r}")
        if num_images is None:
            num_images = 1000 if split == "train" else 100
        if int(num_images) < 1 or int(size) < 16:
            raise ValueError(f"DemoDataset: need `num_images` >= 1 and `size` >= 16; got {num_images}, {size}")
        # No files: set up the base-class attributes directly.
        self.class_names = list(DEMO_CLASSES)
        self.num_classes = len(DEMO_CLASSES) - 1
        self.palette = list(PALETTE)
        self.split, self.size, self.seed, self.num_images = split, int(size), int(seed), int(num_images)
        self.train = (split == "train") if train is None else train
        self.transform = transform if transform is not None else make_transform(self.train, crop_size or self.size)
        self.skip_bad, self.allow_empty_labels, self.check_mask_labels = False, True, False
        self.source = f"demo:{split}"
        self.num_skipped = 0
        self.bad_messages: list[str] = []
        self.samples = []
        # Generating an item costs about as much as a tiny network's training step on it (2-3 ms at 96 px); the
        # demo set is small, so each item is generated once per process and kept (read-only): the same arrays
        # every epoch. Larger sets (over DEMO_CACHE_MIB) are generated on every access.
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = (
            {} if self.num_images * self.size * self.size * 4 <= DEMO_CACHE_MIB * 2**20 else None)

    def __len__(self) -> int:
        return self.num_images

    @property
    def names(self) -> list[str]:
        return [demo_name(self.split, i) for i in range(self.num_images)]

    def name_of(self, index: int) -> str:
        return demo_name(self.split, index)

    def check_masks(self, indices=None, workers: int = 4) -> list[tuple[int, str]]:
        """Generated masks are always valid."""
        return []

    def drop(self, indices) -> None:
        if len(indices):
            raise ValueError("DemoDataset: generated items cannot be dropped")

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The generated item (image, mask, class vector); cached arrays are read-only: copy before writing."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img, mask = generate_demo_image(demo_item_rng(self.seed, self.split, index), self.size)
        item = (img, mask, classes_in_mask(mask, self.num_classes))
        if self._cache is not None:
            for a in item:
                a.flags.writeable = False
            self._cache[index] = item
        return item

    def __repr__(self) -> str:
        return (f"DemoDataset(split={self.split!r}, num_images={self.num_images}, size={self.size}, "
                f"seed={self.seed}, train={self.train}, transform={self.transform!r})")


def write_demo(out: str | os.PathLike, num_train: int = 1000, num_val: int = 100, size: int = 96,
               seed: int = 0) -> Report:
    """Write the demo set in the VOC layout (``tscd data demo``).

    Writes ``JPEGImages/<id>.png`` (lossless, so the files equal :class:`DemoDataset`'s items),
    ``SegmentationClassAug/<id>.png``, ``splits/{train,val,train_aug}.txt`` (``train_aug`` is a
    copy of ``train`` so VOC defaults work) and ``cls_labels.json``. Existing files are overwritten.

    Returns:
        A report of what was written.
    """
    out = Path(out)
    (out / VOC_IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    report = Report(f"demo data at {out}")
    labels: dict[str, list[int]] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        ds = DemoDataset(split, count, size, seed)
        ids = []
        for i in tqdm(range(count), desc=f"demo {split}", disable=None):
            img, mask, cls_label = ds.load_raw(i)
            name = demo_name(split, i)
            Image.fromarray(img).save(out / VOC_IMAGE_DIR / f"{name}.png")
            save_mask(mask, out / VOC_MASK_DIR / f"{name}.png")
            labels[name] = [int(k) + 1 for k in np.flatnonzero(cls_label)]
            ids.append(name)
        write_split_list(out / SPLITS_DIR / f"{split}.txt", ids)
        if split == "train":
            write_split_list(out / SPLITS_DIR / "train_aug.txt", ids)
        report.info(f"split {split}: {count} images of {size}x{size}")
    write_cls_labels(out / CLS_LABELS_FILE, DEMO_CLASSES, labels)
    counts = np.zeros(len(DEMO_CLASSES), dtype=np.int64)
    for classes in labels.values():
        counts[classes] += 1
    report.info("images per class: " + ", ".join(f"{DEMO_CLASSES[k]} {counts[k]}" for k in range(1, len(counts))))
    report.info(f"written: {out / VOC_IMAGE_DIR}, {out / VOC_MASK_DIR}, {out / SPLITS_DIR}, {out / CLS_LABELS_FILE}")
    return report

