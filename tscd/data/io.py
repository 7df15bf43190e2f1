"""Reading and writing the files of a dataset, with errors that name the file.

Everything that touches the disk for images, masks, split lists and class vectors goes through this
module, so every failure looks the same: ``DataError`` (a ``ValueError``) or ``FileNotFoundError``
with the path, what was expected and what was found.

Class-vector file (``cls_labels.json``, written by ``tscd data voc|coco|demo``)::

    {"format": "tscd-cls-labels-v1",
     "classes": ["background", "aeroplane", ...],      # C + 1 names, background first
     "labels": {"2007_000032": [1, 15], ...}}          # present foreground classes, 1..C

The multi-hot vector of an image has a 1 at position ``k - 1`` for every listed class ``k``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from tscd.constants import IGNORE_INDEX
from tscd.data.classes import PALETTE

log = logging.getLogger(__name__)

CLS_LABELS_FILE = "cls_labels.json"
CLS_LABELS_FORMAT = "tscd-cls-labels-v1"
SPLITS_DIR = "splits"
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPG", ".JPEG", ".PNG")


class DataError(ValueError):
    """A dataset file is missing, unreadable or holds values it must not hold."""


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path if it is a directory, else raise ``FileNotFoundError`` naming ``what``."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: expected a directory at {p}, but it does not exist"
                                + (" (it is a file)" if p.exists() else ""))
    return p


def find_image(image_dir: Path, name: str) -> Path | None:
    """Path of image ``name`` in ``image_dir``: the name itself if it has an extension, else the first
    of ``IMAGE_EXTENSIONS`` that exists; None if there is none."""
    direct = image_dir / name
    if direct.suffix in IMAGE_EXTENSIONS and direct.is_file():
        return direct
    for ext in IMAGE_EXTENSIONS:
        p = image_dir / f"{name}{ext}"
        if p.is_file():
            return p
    return None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to RGB.

    Grayscale, palette, CMYK and RGBA images are converted to RGB (alpha is dropped); that is not an
    error.

    Args:
        path: image file (any format PIL reads).

    Returns:
        uint8 array (H, W, 3).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: the file cannot be decoded (corrupt or truncated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()  # force a full decode here, so truncated files fail now, not later
            if im.mode != "RGB":
                log.debug("converting %s from mode %s to RGB", path, im.mode)
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image file {path} cannot be decoded (corrupt or truncated?): {exc}") from exc
    return arr


def load_mask(path: str | os.PathLike, num_classes: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode and validate a label mask (palette or grayscale PNG holding class indices).

    Args:
        path: mask file; mode "P" (palette indices) or "L"/"I" (values are the indices).
        num_classes: C, the number of foreground classes; legal values are 0..C and 255.
        image_size: (H, W) of the image the mask belongs to; checked if given.

    Returns:
        uint8 array (H, W) with values in {0..C, 255}.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: undecodable, an RGB mask, a size different from the image, or illegal values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"mask file {path} cannot be decoded (corrupt or truncated?): {exc}") from exc
    if mode not in ("P", "L", "I", "I;16"):
        raise DataError(f"mask file {path}: expected a single-channel PNG of class indices (mode P or L), "
                        f"got mode {mode}; colour-coded masks must be converted to indices first")
    if image_size is not None and tuple(arr.shape[:2]) != tuple(image_size):
        raise DataError(f"mask file {path}: size (H, W) = {tuple(arr.shape[:2])} differs from its image's "
                        f"{tuple(image_size)}")
    bad = (arr > num_classes) & (arr != IGNORE_INDEX)
    if arr.dtype != np.uint8 or bad.any():
        if bad.any():
            values = sorted(int(v) for v in np.unique(arr[bad])[:10])
            raise DataError(f"mask file {path}: values must be in 0..{num_classes} or {IGNORE_INDEX}, "
                            f"found {values}")
        arr = arr.astype(np.uint8)
    return arr


def classes_in_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Foreground classes present in a mask, as a float32 multi-hot vector (C,) (1..C -> 0..C-1)."""
    counts = np.bincount(mask.reshape(-1), minlength=256)
    return (counts[1:num_classes + 1] > 0).astype(np.float32)


def save_mask(mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 (H, W) mask as a palette PNG, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(list(PALETTE))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def read_split_list(path: str | os.PathLike) -> list[str]:
    """Read a split list: one image id per line.

    Only the first whitespace-separated field counts; a path is reduced to its stem; blank lines and
    lines starting with '#' are skipped.

    Raises:
        FileNotFoundError: the list does not exist.
        DataError: the list is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} does not exist")
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        # Some published lists hold paths ("/JPEGImages/2007_000032.jpg ..."): keep the id only.
        if "/" in token or token.endswith(IMAGE_EXTENSIONS):
            token = Path(token).stem
        ids.append(token)
    if not ids:
        raise DataError(f"split list {path} is empty: expected one image id per line")
    return ids


def write_split_list(path: str | os.PathLike, ids: Iterable[str]) -> None:
    """Write one id per line (creates parent directories)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def write_cls_labels(path: str | os.PathLike, class_names: Iterable[str], labels: dict[str, Iterable[int]]) -> None:
    """Write a class-vector file (format in the module docstring).

    Args:
        path: output JSON file.
        class_names: C + 1 names, background first.
        labels: image id -> present foreground class indices (1..C).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CLS_LABELS_FORMAT, "classes": list(class_names),
               "labels": {k: sorted(int(c) for c in v) for k, v in sorted(labels.items())}}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")))
    os.replace(tmp, path)


def read_cls_labels(path: str | os.PathLike) -> tuple[list[str], dict[str, list[int]]]:
    """Read a class-vector file written by :func:`write_cls_labels`.

    Returns:
        (class_names with background first, image id -> present foreground class indices 1..C).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: not valid JSON, wrong format, or a class index outside 1..C.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-vector file {path} does not exist")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"class-vector file {path} is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CLS_LABELS_FORMAT:
        raise DataError(f"class-vector file {path}: expected a JSON object with format {CLS_LABELS_FORMAT!r}, "
                        f"got {str(payload)[:80]!r}")
    names = list(payload["classes"])
    num_classes = len(names) - 1
    labels = {}
    for name, classes in payload["labels"].items():
        classes = [int(c) for c in classes]
        if any(c < 1 or c > num_classes for c in classes):
            raise DataError(f"class-vector file {path}: image {name} has classes {classes}, expected values "
                            f"in 1..{num_classes}")
        labels[name] = classes
    return names, labels


def multi_hot(classes: Iterable[int], num_classes: int) -> np.ndarray:
    """Class indices 1..C -> float32 multi-hot vector (C,)."""
    vec = np.zeros(num_classes, dtype=np.float32)
    for c in classes:
        vec[int(c) - 1] = 1.0
    return vec
