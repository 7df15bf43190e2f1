"""The dataset base class shared by VOC, COCO, custom folders and the demo set.

An item is a dict (see :mod:`tscd.data`). An index may be a plain ``int`` or the
``(index, epoch, seed)`` key that :func:`tscd.data.build_loader`'s sampler yields; the item's random
generator is ``numpy.random.default_rng([seed, epoch, index])``, so augmentations are reproducible
and differ between samples, epochs and seeds, but not with the number of workers.

Bad files: cheap checks (the image exists, the mask exists, the class vector is present, of the
right length and not empty when training) run at construction; decoding checks (corrupt image,
mask size, mask values, class vector vs mask) run when an item is loaded. Each raises an error that
names the file. With ``skip_bad=True`` (config ``data.skip_bad: true``) a bad sample is instead logged as a
warning and counted in ``num_skipped``: at construction it is dropped; when loading, the next index is loaded instead
(counts made inside DataLoader workers stay in those workers; the warnings reach the log).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from tscd.data.classes import PALETTE
from tscd.data.io import DataError, classes_in_mask, load_image, load_mask
from tscd.data.transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)

#: How to skip bad samples, for messages (the config key, and the Python argument).
SKIP_HINT = "set data.skip_bad=true (skip_bad=True in Python) to skip such samples with a warning"
#: How many following indices ``__getitem__`` tries when ``skip_bad`` is set and an item fails.
MAX_SKIP_TRIES = 10


@dataclass
class Sample:
    """One entry of a dataset.

    Attributes:
        name: image id (file stem).
        image_path: image file.
        mask_path: mask file or None.
        cls_label: float32 (C,) multi-hot vector, or None to derive it from the mask when loading.
    """

    name: str
    image_path: Path
    mask_path: Path | None
    cls_label: np.ndarray | None


ItemKey = int | tuple[int, int, int]


def item_rng(index: int, epoch: int = 0, seed: int = 0) -> np.random.Generator:
    """The random generator of one item: a function of (seed, epoch, index) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


#: The training-view sets :func:`make_transform` knows: ``"none"`` (the crop only), ``"toco"`` (the crop plus ToCo's
#: ``view2`` and ``local`` views, :class:`tscd.data.views.ToCoTrainTransform`).
TRAIN_VIEWS: tuple[str, ...] = ("none", "toco")


def make_transform(train: bool, crop_size: int = 512, views: str | None = None, **kwargs: Any) -> Callable:
    """The transform of a dataset.

    Args:
        train: training augmentation, else ``EvalTransform()`` (then ``views`` and ``kwargs`` are ignored).
        crop_size: the training crop.
        views: ``None``/``"none"``: ``TrainTransform(crop_size, **kwargs)``; ``"toco"``:
            ``ToCoTrainTransform(crop_size, **kwargs)`` (needs torchvision), whose items carry ``item["views"]``.
        **kwargs: the transform's other arguments (``scale_range``, ``flip_prob``, ``img_pad_value``, ...).

    Raises:
        ValueError: an unknown ``views``.
    """
    views = "none" if views is None else views
    if views not in TRAIN_VIEWS:
        raise ValueError(f"make_transform: `views` must be one of {TRAIN_VIEWS}; got {views!r}")
    if not train:
        return EvalTransform()
    if views == "toco":
        from tscd.data.views import ToCoTrainTransform

        return ToCoTrainTransform(crop_size, **kwargs)
    return TrainTransform(crop_size, **kwargs)


class SegmentationDataset(Dataset):
    """Images with image-level labels and optional masks; base class of every dataset here.

    Args:
        samples: the entries (see :class:`Sample`).
        class_names: C + 1 names, background first.
        train: training mode (affects the default transform and the empty-label check).
        transform: callable ``(img, label, rng) -> (img, label, img_box)``, or ``-> (img, label, img_box, views)``
            with ``views`` a dict of named tensors, which becomes ``item["views"]``; default
            :class:`TrainTransform` (``crop_size``) if ``train`` else :class:`EvalTransform`.
        crop_size: crop of the default training transform.
        skip_bad: skip bad samples with a warning instead of raising (see the module docstring).
        allow_empty_labels: accept images without any foreground class; default: only when not
            training (an empty vector gives the classifier nothing to learn from).
        check_mask_labels: when a mask is loaded, check that the classes in the mask equal the class
            vector (catches stale class-vector files); meant for datasets whose vectors come from masks.
        source: what the samples came from (a path), for messages.
    """

    def __init__(self, samples: Sequence[Sample], class_names: Sequence[str], *, train: bool = False,
                 transform: Callable | None = None, crop_size: int = 512, skip_bad: bool = False,
                 allow_empty_labels: bool | None = None, check_mask_labels: bool = False,
                 source: str = "") -> None:
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names) - 1
        self.palette = list(PALETTE)
        self.train = train
        self.transform = transform if transform is not None else make_transform(train, crop_size)
        self.skip_bad = skip_bad
        self.allow_empty_labels = (not train) if allow_empty_labels is None else allow_empty_labels
        self.check_mask_labels = check_mask_labels
        self.source = source
        self.num_skipped = 0
        self.bad_messages: list[str] = []  # what was skipped at construction (with skip_bad)
        self.samples = self._check_samples(samples)
        if not self.samples:
            raise DataError(f"{type(self).__name__} ({source}): no usable samples"
                            + (f" ({self.num_skipped} skipped as bad)" if self.num_skipped else ""))

    # ------------------------------------------------------------------ construction checks
    def _bad(self, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message + f" ({SKIP_HINT})")
        self.num_skipped += 1
        self.bad_messages.append(message)
        log.warning("skipping: %s", message)

    def _check_samples(self, samples: Sequence[Sample]) -> list[Sample]:
        kept = []
        for s in samples:
            if not Path(s.image_path).is_file():
                self._bad(f"{self.source}: image {s.name!r} listed but its file {s.image_path} does not exist")
                continue
            if s.mask_path is not None and not Path(s.mask_path).is_file():
                self._bad(f"{self.source}: mask file {s.mask_path} of image {s.name!r} does not exist")
                continue
            if s.cls_label is not None:
                if s.cls_label.shape != (self.num_classes,):
                    self._bad(f"{self.source}: class vector of image {s.name!r} has shape {s.cls_label.shape}, "
                              f"expected ({self.num_classes},)")
                    continue
                if not self.allow_empty_labels and not s.cls_label.any():
                    self._bad(f"{self.source}: image {s.name!r} has an empty class vector (no foreground class); "
                              "it cannot be used for training")
                    continue
            elif s.mask_path is None:
                self._bad(f"{self.source}: image {s.name!r} has neither a class vector nor a mask")
                continue
            kept.append(s)
        if self.num_skipped:
            log.warning("%s: skipped %d bad sample(s) of %d", self.source, self.num_skipped, len(samples))
        return kept

    # ------------------------------------------------------------------ loading
    def __len__(self) -> int:
        return len(self.samples)

    @property
    def names(self) -> list[str]:
        """Image ids, in dataset order."""
        return [s.name for s in self.samples]

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Decode and validate one sample, untransformed.

        Returns:
            (img uint8 (H, W, 3), mask uint8 (H, W) or None, cls_label float32 (C,)).

        Raises:
            DataError / FileNotFoundError naming the bad file.
        """
        s = self.samples[index]
        img = load_image(s.image_path)
        mask = None
        if s.mask_path is not None:
            mask = load_mask(s.mask_path, self.num_classes, image_size=img.shape[:2])
        cls_label = s.cls_label
        if mask is not None:
            from_mask = classes_in_mask(mask, self.num_classes)
            if cls_label is None:
                cls_label = from_mask
            elif self.check_mask_labels and not np.array_equal(from_mask, cls_label):
                raise DataError(
                    f"{self.source}: class vector of image {s.name!r} {self._fmt(cls_label)} does not match the "
                    f"classes in its mask {s.mask_path} {self._fmt(from_mask)}; the class-vector file is stale: "
                    "regenerate it (tscd data voc|coco --root DIR)")
        if not self.allow_empty_labels and not cls_label.any():
            raise DataError(f"{self.source}: image {s.name!r} has an empty class vector (mask {s.mask_path})")
        return img, mask, cls_label

    def name_of(self, index: int) -> str:
        """Image id of item ``index``."""
        return self.samples[index].name

    def _fmt(self, vec: np.ndarray) -> list[str]:
        return [self.class_names[k + 1] for k in np.flatnonzero(vec)]

    def get_item(self, index: int, epoch: int = 0, seed: int = 0) -> dict[str, Any]:
        """The item at ``index`` with the augmentation of (seed, epoch, index); no skipping."""
        img, mask, cls_label = self.load_raw(index)
        out = self.transform(img, mask, item_rng(index, epoch, seed))
        img_t, label_t, box = out[:3]
        item = {"name": self.name_of(index), "img": img_t,
                "cls_label": torch.from_numpy(np.asarray(cls_label, dtype=np.float32).copy()), "img_box": box}
        if label_t is not None:
            item["label"] = label_t
        if len(out) > 3:  # a transform with extra views (e.g. ToCoTrainTransform) returns them as a 4th element
            item["views"] = dict(out[3])
        return item

    def __getitem__(self, key: ItemKey) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, epoch, seed = (int(k) for k in key)
        else:
            index, epoch, seed = int(key), 0, 0
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {len(self)} samples")
        if not self.skip_bad:
            return self.get_item(index, epoch, seed)
        for attempt in range(MAX_SKIP_TRIES):
            i = (index + attempt) % len(self)
            try:
                return self.get_item(i, epoch, seed)
            except (DataError, OSError) as exc:
                self.num_skipped += 1
                log.warning("skipping bad sample %r (%s); %d skipped so far in this process",
                            self.name_of(i), exc, self.num_skipped)
        raise DataError(f"{self.source}: {MAX_SKIP_TRIES} consecutive bad samples from index {index}; "
                        "giving up (check the data with `tscd data check`)")

    def check_masks(self, indices: Sequence[int] | None = None, workers: int = 4) -> list[tuple[int, str]]:
        """Decode and validate the masks of ``indices`` (default: all) without decoding the images: what evaluation
        needs, cheaply, before a run starts (``workers`` threads). An entry without a mask is an error too.

        Returns:
            (index, message) of each bad entry, the message naming the file.
        """
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        def check(i: int) -> tuple[int, str] | None:
            s = self.samples[i]
            if s.mask_path is None:
                return i, f"{self.source}: image {s.name!r} has no mask; evaluation needs masks"
            try:
                with Image.open(s.image_path) as im:  # the header only
                    size = (im.height, im.width)
                load_mask(s.mask_path, self.num_classes, image_size=size)
            except (DataError, OSError, SyntaxError) as exc:
                return i, str(exc)
            return None

        indices = list(range(len(self)) if indices is None else indices)
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(indices)))) as pool:  # PNG decoding drops the GIL
            return [r for r in pool.map(check, indices) if r is not None]

    def check_eval_masks(self, num: int | None, skip_bad: bool, what: str) -> None:
        """Decode the masks an evaluation of the first ``num`` items (None: all) will score, now: a bad mask must
        not cost a training run at its end. With ``skip_bad`` the bad entries are dropped, with a warning.

        Raises:
            DataError: a bad mask (naming the first, and how many more), unless ``skip_bad``.
        """
        total = len(self) if num is None else min(num, len(self))
        errors = self.check_masks(range(total))
        if not errors:
            return
        if not skip_bad:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise DataError(f"{what}: {errors[0][1]}{more}; fix the masks, or set data.skip_bad=true to leave such "
                            f"images out of validation")
        self.drop([i for i, _ in errors])
        log.warning("%s: left out %d image(s) with bad masks: %s", what, len(errors),
                    "; ".join(msg for _, msg in errors[:5]))

    def drop(self, indices: Sequence[int]) -> None:
        """Remove the entries at ``indices`` (e.g. bad masks found by :meth:`check_masks`)."""
        bad = set(int(i) for i in indices)
        self.samples = [s for i, s in enumerate(self.samples) if i not in bad]
        self.num_skipped += len(bad)

    def verify(self, indices: Sequence[int] | None = None) -> list[str]:
        """Decode and validate samples without raising; returns one error message per bad sample."""
        errors = []
        for i in range(len(self)) if indices is None else indices:
            try:
                self.load_raw(i)
            except (DataError, OSError) as exc:
                errors.append(str(exc))
        return errors

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, samples={len(self)}, classes={self.num_classes}, "
                f"train={self.train}, transform={self.transform!r})")
