"""Your own data: a folder of images and a file of image-level labels (+ optional masks).

Labels file, either

* CSV: one line per image, ``image_id,class1;class2`` (an optional header line whose first field is
  ``image_id``, ``image``, ``id``, ``name`` or ``filename`` is skipped), or
* JSON: ``{"image_id": ["class1", "class2"], ...}`` or
  ``{"classes": ["class1", ...], "labels": {"image_id": [...]}}``.

``image_id`` is a file name in the image folder, with or without its extension. Class names are
matched exactly (case and spaces matter).

The class list (foreground, in index order 1..C) is, in order of precedence: the explicit
``classes`` argument (a list, or a text file with one name per line); the ``classes`` entry of a
JSON labels file; a ``classes.txt`` next to the labels file; otherwise the sorted set of names in
the labels file (logged). Masks (palette/grayscale PNGs ``<image_id>.png`` with values 0..C and 255,
for evaluation) require an explicit class list, so that the mask values cannot silently mean
different classes than the labels.

Folder convention used by ``build_dataset("custom", split, root)``: ``root/images/``,
``root/labels_<split>.{csv,json}`` or else ``root/labels.{csv,json}``, optional ``root/masks/`` and
``root/classes.txt``.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tscd.data.base import Sample, SegmentationDataset
from tscd.data.io import DataError, find_image, require_dir

log = logging.getLogger(__name__)

_HEADER_FIELDS = {"image_id", "image", "id", "name", "filename", "file_name"}


def read_labels_file(path: str | os.PathLike) -> tuple[dict[str, list[str]], list[str] | None]:
    """Read a CSV or JSON labels file (formats in the module docstring).

    Returns:
        (image id -> class names, class list from the file or None).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: unparsable file, unknown extension, duplicated ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    labels: dict[str, list[str]] = {}
    classes = None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"labels file {path} is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and "labels" in data and isinstance(data["labels"], dict):
            classes = data.get("classes")
            data = data["labels"]
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise DataError(f"labels file {path}: expected {{image_id: [class names]}}, got {str(data)[:80]!r}")
        labels = {str(k): [str(c).strip() for c in v] for k, v in data.items()}
    elif path.suffix.lower() in (".csv", ".txt"):
        with path.open(newline="") as f:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if lineno == 1 and row[0].strip().lower() in _HEADER_FIELDS:
                    continue
                if len(row) > 2:
                    raise DataError(f"labels file {path}, line {lineno}: expected `image_id,class1;class2`, got "
                                    f"{len(row)} fields {row}; separate classes with ';'")
                image_id = row[0].strip()
                names = [c.strip() for c in row[1].split(";")] if len(row) > 1 else []
                if image_id in labels:
                    raise DataError(f"labels file {path}, line {lineno}: image id {image_id!r} appears twice")
                labels[image_id] = [c for c in names if c]
    else:
        raise DataError(f"labels file {path}: expected a .csv or .json file, got {path.suffix!r}")
    if not labels:
        raise DataError(f"labels file {path} lists no images")
    return labels, (list(classes) if classes is not None else None)


def read_class_list(classes: Sequence[str] | str | os.PathLike) -> list[str]:
    """A list of foreground class names, or a text file with one per line; background is removed if first."""
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise FileNotFoundError(f"class list file {path} does not exist")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [str(c).strip() for c in classes]
    if names and names[0].lower() == "background":
        names = names[1:]
    if not names or len(set(names)) != len(names):
        raise DataError(f"class list must be non-empty and without duplicates; got {names}")
    return names


class CustomDataset(SegmentationDataset):
    """A folder of images with image-level labels from a CSV/JSON file (module docstring).

    Args:
        image_dir: folder of images.
        labels_file: CSV or JSON labels file.
        mask_dir: optional folder of masks ``<image_id>.png`` (needs an explicit class list).
        classes: foreground class names in index order, or a text file with one per line.
        train, crop_size, transform, skip_bad, allow_empty_labels: see :class:`SegmentationDataset`.

    Raises:
        FileNotFoundError: missing folder or file.
        DataError: unknown class names, an image without its file, a missing mask, empty labels when
            training (unless ``skip_bad``); masks without an explicit class list.
    """

    def __init__(self, image_dir: str | os.PathLike, labels_file: str | os.PathLike, *,
                 mask_dir: str | os.PathLike | None = None, classes: Sequence[str] | str | os.PathLike | None = None,
                 train: bool = False, crop_size: int = 512, transform: Callable | None = None,
                 skip_bad: bool = False, allow_empty_labels: bool | None = None) -> None:
        img_dir = require_dir(image_dir, "CustomDataset `image_dir`")
        labels_path = Path(labels_file)
        labels, file_classes = read_labels_file(labels_path)
        sidecar = labels_path.parent / "classes.txt"
        if classes is not None:
            names = read_class_list(classes)
        elif file_classes is not None:
            names = read_class_list(file_classes)
        elif sidecar.is_file():
            names = read_class_list(sidecar)
        else:
            if mask_dir is not None:
                raise DataError(f"CustomDataset: masks in {mask_dir} need an explicit class list (argument `classes`, "
                                f"a 'classes' entry in {labels_path}, or {sidecar}) so that mask value k means "
                                "class k; the order cannot be guessed from the labels file")
            names = sorted({c for v in labels.values() for c in v})
            if not names:
                raise DataError(f"labels file {labels_path} names no class at all")
            log.info("classes from %s (sorted; index 1..%d): %s", labels_path, len(names), names)
        index = {n: k for k, n in enumerate(names)}
        msk_dir = require_dir(mask_dir, "CustomDataset `mask_dir`") if mask_dir is not None else None
        samples = []
        for image_id, class_list in labels.items():
            unknown = [c for c in class_list if c not in index]
            if unknown:
                raise DataError(f"labels file {labels_path}: image {image_id!r} has unknown class(es) {unknown}; "
                                f"known classes: {names}")
            vec = np.zeros(len(names), dtype=np.float32)
            vec[[index[c] for c in class_list]] = 1.0
            image_path = find_image(img_dir, image_id) or img_dir / image_id
            stem = Path(image_id).stem if Path(image_id).suffix else image_id
            mask_path = msk_dir / f"{stem}.png" if msk_dir is not None else None
            samples.append(Sample(stem, image_path, mask_path, vec))
        self.image_dir, self.labels_file, self.mask_dir = img_dir, labels_path, msk_dir
        super().__init__(samples, ["background", *names], train=train, transform=transform, crop_size=crop_size,
                         skip_bad=skip_bad, allow_empty_labels=allow_empty_labels, check_mask_labels=False,
                         source=str(labels_path))


def custom_paths(root: str | os.PathLike, split: str) -> dict[str, Path | None]:
    """Resolve the folder convention of ``build_dataset("custom", split, root)`` (module docstring)."""
    root = require_dir(root, "custom dataset `root`")
    labels = None
    for stem in (f"labels_{split}", "labels"):
        for ext in (".csv", ".json"):
            if (root / f"{stem}{ext}").is_file():
                labels = root / f"{stem}{ext}"
                break
        if labels is not None:
            break
    if labels is None:
        raise FileNotFoundError(f"custom dataset: no labels file in {root}: expected labels_{split}.csv/.json or "
                                "labels.csv/.json")
    image_dir = root / "images" if (root / "images").is_dir() else root
    return {"image_dir": image_dir, "labels_file": labels,
            "mask_dir": root / "masks" if (root / "masks").is_dir() else None,
            "classes": root / "classes.txt" if (root / "classes.txt").is_file() else None}
