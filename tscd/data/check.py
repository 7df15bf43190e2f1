"""``tscd data check``: load a prepared dataset the way training will, and report every problem."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from tscd.data.factory import build_dataset
from tscd.data.io import SPLITS_DIR, DataError
from tscd.data.report import Report
from tscd.data.voc import VOC_SPLITS


def default_splits(name: str, root: Path) -> list[str]:
    """The splits to check when none are given."""
    if name in ("voc", "demo", "coco"):
        found = sorted(p.stem for p in (root / SPLITS_DIR).glob("*.txt"))
        if name == "voc" and not found:
            return [s for s in VOC_SPLITS if (root / "ImageSets" / "Segmentation" / f"{s}.txt").is_file()]
        return found
    found = sorted(p.stem[len("labels_"):] for ext in ("csv", "json") for p in root.glob(f"labels_*.{ext}"))
    return found or ["all"]


def check_dataset(name: str, root: str | os.PathLike, splits: Sequence[str] | None = None, num: int = 100,
                  seed: int = 0) -> Report:
    """Check a prepared dataset: construction checks on every entry, full decoding of a sample.

    Args:
        name: ``voc``, ``coco``, ``custom`` or ``demo`` (a folder written by ``tscd data demo``).
        root: dataset root.
        splits: splits to check (default: every split list / labels file found).
        num: how many items per split to decode and validate (-1: all).
        seed: choice of the sample.

    Returns:
        The report; ``report.ok`` is False if any entry is bad.
    """
    root = Path(root)
    report = Report(f"check of {name} data at {root}")
    if not root.is_dir():
        report.error(f"root {root} does not exist or is not a directory")
        return report
    splits = list(splits) if splits else default_splits(name, root)
    if not splits:
        report.error(f"no split lists found under {root / SPLITS_DIR}; prepare the data first (tscd data {name})")
        return report
    for split in splits:
        try:
            ds = build_dataset(name, split, root, train=False, skip_bad=True, allow_empty_labels=True)
        except (FileNotFoundError, DataError, ValueError) as exc:
            report.error(f"split {split}: {exc}")
            continue
        for msg in ds.bad_messages:
            report.error(msg)
        n = len(ds)
        if 0 <= num < n:
            indices = sorted(np.random.default_rng(seed).choice(n, size=num, replace=False).tolist())
        else:
            indices = list(range(n))
        errors = ds.verify(indices)
        for err in errors:
            report.error(err)
        empty = sum(1 for s in ds.samples if s.cls_label is not None and not s.cls_label.any())
        report.info(f"split {split}: {n} usable entries ({ds.num_skipped} bad at start-up), {ds.num_classes} classes; "
                    f"decoded {len(indices)}: {len(errors)} bad")
        if empty:
            report.warn(f"split {split}: {empty} image(s) with an empty class vector (rejected for training unless "
                        "data.skip_bad=true)")
    return report
