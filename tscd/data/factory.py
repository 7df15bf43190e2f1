"""``build_dataset``: one entry point for every dataset name."""
from __future__ import annotations

import os
from typing import Any, Sequence

from tscd.data.base import SegmentationDataset, make_transform
from tscd.data.coco import COCODataset
from tscd.data.custom import CustomDataset, custom_paths
from tscd.data.demo import DemoDataset
from tscd.data.voc import VOCDataset

DATASET_NAMES: tuple[str, ...] = ("voc", "coco", "custom", "demo")


def build_dataset(name: str, split: str, root: str | os.PathLike | None, train: bool, crop_size: int | None = None, *,
                  skip_bad: bool = False, scale_range: Sequence[float] = (0.5, 2.0), flip_prob: float = 0.5,
                  img_pad_value: Sequence[float] | float | None = None, views: str | None = None,
                  **kwargs: Any) -> SegmentationDataset:
    """Build a dataset by name.

    Args:
        name: ``voc``, ``coco``, ``custom`` or ``demo``.
        split: ``voc``: ``train_aug``/``train``/``val`` (any ``splits/<name>.txt``); ``coco``:
            ``train``/``val``; ``custom``: selects ``labels_<split>.{csv,json}`` (else ``labels.*``);
            ``demo``: ``train``/``val``.
        root: dataset root. For ``demo``, None generates the data in memory; a folder written by
            ``tscd data demo`` is read like VOC.
        train: training augmentation (rescale, flip, pad, crop) if True; normalisation only if False.
        crop_size: training crop; default 512, or the image size for the in-memory demo set (96).
        skip_bad: skip bad samples with a counted warning instead of raising.
        scale_range, flip_prob, img_pad_value: training-transform settings (:class:`TrainTransform`).
        views: extra training views (:func:`tscd.data.base.make_transform`): ``None``/``"none"``, or ``"toco"``
            for ToCo's ``item["views"] = {"view2", "local"}`` (:class:`tscd.data.views.ToCoTrainTransform`);
            checked even when ``train`` is False, and then unused.
        **kwargs: per dataset: ``voc``: ``split_file``, ``allow_empty_labels``; ``coco``: ``year``,
            ``allow_empty_labels``; ``custom``: ``image_dir``, ``labels_file``, ``mask_dir``,
            ``classes``, ``allow_empty_labels`` (override the folder convention); ``demo``:
            ``num_images``, ``size``, ``seed``.

    Returns:
        The dataset (item format in :mod:`tscd.data`).

    Raises:
        ValueError: unknown name, split or views; TypeError: an argument the dataset does not take;
        FileNotFoundError / DataError: see the dataset classes.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"build_dataset: `name` must be one of {DATASET_NAMES}; got {name!r}")
    if name == "demo" and root is None and crop_size is None:
        crop_size = int(kwargs.get("size", 96))
    crop_size = 512 if crop_size is None else int(crop_size)
    transform = make_transform(train, crop_size, views, scale_range=scale_range, flip_prob=flip_prob,
                               img_pad_value=img_pad_value)

    def take(allowed: Sequence[str]) -> dict[str, Any]:
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise TypeError(f"build_dataset({name!r}): unexpected argument(s) {unknown}; allowed: {sorted(allowed)}")
        return dict(kwargs)

    if name == "demo" and root is None:
        extra = take(("num_images", "size", "seed"))
        return DemoDataset(split, train=train, transform=transform, **extra)
    if root is None:
        raise ValueError(f"build_dataset({name!r}): `root` is required (only 'demo' can be generated in memory)")
    if name in ("voc", "demo"):
        return VOCDataset(root, split, train, crop_size, transform=transform, skip_bad=skip_bad,
                          **take(("split_file", "allow_empty_labels")))
    if name == "coco":
        return COCODataset(root, split, train, crop_size, transform=transform, skip_bad=skip_bad,
                           **take(("year", "allow_empty_labels")))
    extra = take(("image_dir", "labels_file", "mask_dir", "classes", "allow_empty_labels"))
    paths = {} if {"image_dir", "labels_file"} <= set(extra) else custom_paths(root, split)
    paths.update(extra)
    return CustomDataset(paths.pop("image_dir"), paths.pop("labels_file"), train=train, crop_size=crop_size,
                         transform=transform, skip_bad=skip_bad, **paths)
