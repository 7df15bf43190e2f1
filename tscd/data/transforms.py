"""Training and evaluation transforms (docs/method.md 5), and (de)normalisation.

A transform maps ``(img uint8 (H, W, 3), label uint8 (H, W) or None, rng)`` to
``(img float32 (3, h, w), label int64 (h, w) or None, img_box int64 (4,))``. All randomness comes
from the ``numpy.random.Generator`` passed in, which the dataset derives from (seed, epoch, index),
so an item's augmentation does not depend on the worker that loads it.

``img_box = [top, bottom, left, right]`` marks the real image region inside the output:
rows ``top:bottom`` and columns ``left:right`` (bottom and right exclusive, Python slice
convention). Everything outside it is padding: the label there is 255 and the image is the pad colour,
by default raw 0 (black) as in the official code, i.e. (-2.118, -2.036, -1.804) after normalisation
(``pad_value="mean"`` gives 0 after normalisation instead).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from tscd.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

TransformOutput = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)

#: Named pad colours of the training crop canvas (0..255 scale, before normalisation).
PAD_VALUES: dict[str, tuple[float, float, float]] = {"black": (0.0, 0.0, 0.0), "mean": tuple(IMAGENET_MEAN)}


def resolve_pad_value(value: str | Sequence[float] | float | None) -> tuple[float, float, float]:
    """The RGB pad colour (0..255 scale) of ``data.pad_value``: ``"black"`` (official, raw 0), ``"mean"`` (the
    ImageNet mean, 0 after normalisation), one number, or ``[r, g, b]``. ``None`` means ``"black"``.

    Raises:
        ValueError: an unknown name, a wrong number of values, or values outside [0, 255].
    """
    if value is None:
        value = "black"
    if isinstance(value, str):
        if value not in PAD_VALUES:
            raise ValueError(f"pad_value: must be one of {', '.join(PAD_VALUES)} or [r, g, b] on the 0..255 scale; "
                             f"got {value!r}")
        return PAD_VALUES[value]
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.size != 3 or not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"pad_value: must be black, mean, one number or [r, g, b] with values in [0, 255]; "
                         f"got {value!r}")
    return tuple(float(v) for v in arr)


def normalize(img: np.ndarray) -> torch.Tensor:
    """uint8/float (H, W, 3) on the 0..255 scale -> float32 tensor (3, H, W) with ImageNet mean/std."""
    arr = (np.asarray(img, dtype=np.float32) - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def denormalize(img: torch.Tensor) -> torch.Tensor:
    """Undo :func:`normalize`: normalised image -> float image in [0, 1] (for VARM/PAR, docs/method.md 3).

    Args:
        img: float tensor (3, H, W) or (B, 3, H, W), any device, ImageNet-normalised.

    Returns:
        Tensor of the same shape, dtype and device, values clamped to [0, 1].

    Raises:
        ValueError: ``img`` is not 3-D or 4-D with 3 channels.
    """
    if img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"denormalize: `img` must be (3, H, W) or (B, 3, H, W); got shape {tuple(img.shape)}")
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype, device=img.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype, device=img.device).view(shape)
    return ((img * std + mean) / 255.0).clamp_(0.0, 1.0)


def _label_tensor(label: np.ndarray | None) -> torch.Tensor | None:
    return None if label is None else torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


class EvalTransform:
    """Evaluation transform: native size, normalise only; ``img_box`` is the whole image."""

    def __call__(self, img: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None
                 ) -> TransformOutput:
        h, w = img.shape[:2]
        return normalize(img), _label_tensor(label), torch.tensor([0, h, 0, w], dtype=torch.int64)

    def __repr__(self) -> str:
        return "EvalTransform()"


class TrainTransform:
    """Training augmentation of docs/method.md 5: rescale, flip, pad, crop, normalise.

    Steps, in order: rescale by ``r ~ U(scale_range)`` (bilinear image, nearest label; output size
    ``int(r * H), int(r * W)`` (floor, as the official code), at least 1); horizontal flip with probability
    ``flip_prob``;
    place the image at a random offset in a canvas of ``max(crop, h) x max(crop, w)`` filled with
    ``img_pad_value`` (image) and 255 (label); take a random ``crop x crop`` window; normalise.

    Args:
        crop_size: side of the square output (512 in the paper).
        scale_range: (low, high) of the uniform rescale factor.
        flip_prob: probability of a horizontal flip.
        img_pad_value: colour of the image padding (:func:`resolve_pad_value`: ``"black"``, ``"mean"``, a
            number or RGB on the 0..255 scale). Default: black (raw 0), the official canvas.
    """

    def __init__(self, crop_size: int = 512, scale_range: Sequence[float] = (0.5, 2.0), flip_prob: float = 0.5,
                 img_pad_value: str | Sequence[float] | float | None = None) -> None:
        if int(crop_size) < 1:
            raise ValueError(f"TrainTransform: `crop_size` must be a positive int; got {crop_size}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"TrainTransform: `scale_range` must be (low, high) with 0 < low <= high; "
                             f"got {tuple(scale_range)}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"TrainTransform: `flip_prob` must be in [0, 1]; got {flip_prob}")
        self.crop_size = int(crop_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = float(flip_prob)
        self.img_pad_value = np.asarray(resolve_pad_value(img_pad_value), dtype=np.float32)

    def __call__(self, img: np.ndarray, label: np.ndarray | None, rng: np.random.Generator) -> TransformOutput:
        """Augment one image (and its mask).

        Args:
            img: uint8 (H, W, 3), 0..255.
            label: uint8 (H, W) mask or None.
            rng: the item's random generator.

        Returns:
            img float32 (3, crop, crop) normalised; label int64 (crop, crop) with 255 in padding, or
            None; img_box int64 (4,) [top, bottom, left, right], bottom/right exclusive.
        """
        out_img, out_label, box = self.crop_arrays(img, label, rng)
        return normalize(out_img), _label_tensor(out_label), box

    def crop_arrays(self, img: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor]:
        """The augmentation of :meth:`__call__` before normalisation (the same random draws, in the same order).

        Returns:
            img float32 (crop, crop, 3) on the 0..255 scale (padding = ``img_pad_value``); label uint8
            (crop, crop) with 255 in padding, or None; img_box int64 (4,) as in :meth:`__call__`.
        """
        h, w = img.shape[:2]
        # 1. random rescale
        lo, hi = self.scale_range
        r = float(rng.uniform(lo, hi)) if hi > lo else lo
        nh, nw = max(1, int(h * r)), max(1, int(w * r))  # int(): floor, as the official code
        if (nh, nw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
            if label is not None:
                label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        # 2. horizontal flip
        if rng.random() < self.flip_prob:
            img = img[:, ::-1]
            if label is not None:
                label = label[:, ::-1]
        # 3. pad to at least the crop, the image at a random offset inside the canvas
        crop = self.crop_size
        ph, pw = max(crop, nh), max(crop, nw)
        oy, ox = int(rng.integers(0, ph - nh + 1)), int(rng.integers(0, pw - nw + 1))
        # 4. random crop of the canvas
        y0, x0 = int(rng.integers(0, ph - crop + 1)), int(rng.integers(0, pw - crop + 1))
        # Intersection of the image region [oy, oy+nh) x [ox, ox+nw) with the crop window, in crop coordinates.
        top, bottom = max(oy - y0, 0), min(oy + nh - y0, crop)
        left, right = max(ox - x0, 0), min(ox + nw - x0, crop)
        sy, sx = y0 + top - oy, x0 + left - ox  # matching offsets inside the (rescaled) image
        out_img = np.empty((crop, crop, 3), dtype=np.float32)
        out_img[...] = self.img_pad_value
        out_img[top:bottom, left:right] = img[sy:sy + bottom - top, sx:sx + right - left]
        out_label = None
        if label is not None:
            out_label = np.full((crop, crop), IGNORE_INDEX, dtype=np.uint8)
            out_label[top:bottom, left:right] = label[sy:sy + bottom - top, sx:sx + right - left]
        box = torch.tensor([top, bottom, left, right], dtype=torch.int64)
        return out_img, out_label, box

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"flip_prob={self.flip_prob}, img_pad_value={tuple(float(v) for v in self.img_pad_value)})")
