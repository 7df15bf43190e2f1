"""The ToCo training views (Ru et al., CVPR 2023): the augmented crop plus two more views of each image.

What one training item gets
---------------------------
:class:`ToCoTrainTransform` first makes the usual training crop of :class:`~tscd.data.transforms.TrainTransform`
(rescale, horizontal flip, black canvas, random crop; ``img_box`` marks the real image inside it). From that
crop, as a uint8 picture, and from the untouched input image it then derives:

* ``local``: the crop through the *photometric chain* (below), then a Gaussian blur with probability 0.5.
  The ToCo recipe later cuts its small local crops out of this view.
* the main image (the ``img`` of the item): the same crop through its own draw of the photometric chain,
  then a Gaussian blur that is always applied.
* ``view2``: a random resized crop of the *original* image (area fraction ``U(0.4, 1)`` of the image, aspect
  ratio log-uniform in ``[3/4, 4/3]``, bicubic, resized to ``crop x crop``), then the photometric chain,
  a Gaussian blur with probability 0.1 and a solarisation (pixels >= 128 become ``255 - v``) with
  probability 0.2.

The photometric chain is, in order: a horizontal flip (p 0.5); with p 0.8 a colour jitter (brightness and
contrast factors ``U(0.6, 1.4)``, saturation ``U(0.8, 1.2)``, hue shift ``U(-0.1, 0.1)``, the four adjustments
applied in a random order); a conversion to grey kept as three equal channels (p 0.2). The blur is PIL's
Gaussian blur with a radius ``U(0.1, 2.0)``. All three outputs are ImageNet-normalised float32
``(3, crop, crop)``. The probabilities and ranges are constructor arguments; the defaults are ToCo's.

Randomness and draw order
-------------------------
Every random number comes from the item's ``numpy.random.Generator`` (as for every transform here), so an
item's views are a function of (seed, epoch, index). The draws are taken in the official order: the crop's
(exactly those of ``TrainTransform``, so the box and the label equal ``TrainTransform``'s for the same
generator), then the local view's, the main image's, and view2's. The three photometric chains are
independent draws: the local view and the main image are separately flipped and jittered versions of the same
crop. Where a probability gate fails, the parameters it guards are not drawn (as in torchvision).

Quirks kept from the official code
----------------------------------
* The main image is flipped (and jittered, blurred) *after* ``img_box`` was computed, and the box is not
  mirrored: when this second flip happens and the crop has padding on one side, ``img_box`` describes the
  unflipped crop, not the image the network sees (the official training still uses it as is, to blank the
  pseudo labels and the refinement outside the box, so some padding counts as image and some image columns
  as padding). The label returned with it (when the dataset has masks) is likewise the unflipped crop's.
* The local view has its own flip draw, so it is mirrored relative to the main image half the time, although
  the recipe cuts its local crops from it where the main image's CAM is uncertain.
* The photometric chain sees the padding too: jitter and blur change the black canvas (blur smears the image
  edge into it), so the padding of the outputs is not exactly normalised black.
* With a non-black ``img_pad_value`` the canvas is rounded to integers before the views are made (PIL works
  on uint8).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from tscd.data.transforms import TrainTransform, _label_tensor, normalize

#: The keys of the extra views a :class:`ToCoTrainTransform` returns (and of ``item["views"]``).
TOCO_VIEW_NAMES: tuple[str, ...] = ("view2", "local")

ViewsTransformOutput = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor, dict[str, torch.Tensor]]


def _functional() -> Any:
    """``torchvision.transforms.functional``, imported on first use (importing tscd.data does not need it)."""
    try:
        from torchvision.transforms import functional
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency of the ToCo recipe only
        raise ImportError("ToCoTrainTransform needs torchvision (pip install torchvision)") from exc
    return functional


def _gate(rng: np.random.Generator, p: float) -> bool:
    """One uniform draw; True with probability ``p`` (never for 0, always for 1)."""
    return bool(rng.random() < p)


def jitter_ranges(brightness: float, contrast: float, saturation: float, hue: float
                  ) -> tuple[tuple[float, float] | None, ...]:
    """torchvision ``ColorJitter``'s ranges: ``[max(0, 1 - x), 1 + x]`` for brightness, contrast and saturation,
    ``[-hue, hue]`` for hue; None for a zero strength (that adjustment is off and draws nothing).

    Raises:
        ValueError: a negative strength, or ``hue`` above 0.5.
    """
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation), ("hue", hue)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"ToCoTrainTransform: `{name}` must be a finite number >= 0; got {v}")
    if hue > 0.5:
        raise ValueError(f"ToCoTrainTransform: `hue` must be in [0, 0.5]; got {hue}")
    ranges: list[tuple[float, float] | None] = [
        (max(0.0, 1.0 - float(v)), 1.0 + float(v)) if v > 0 else None for v in (brightness, contrast, saturation)]
    ranges.append((-float(hue), float(hue)) if hue > 0 else None)
    return tuple(ranges)


def sample_jitter(rng: np.random.Generator, ranges: Sequence[tuple[float, float] | None]
                  ) -> tuple[list[int], list[float | None]]:
    """torchvision ``ColorJitter.get_params`` on ``rng``: a random order of the four adjustments
    (0 brightness, 1 contrast, 2 saturation, 3 hue), then one uniform factor per enabled adjustment."""
    order = [int(k) for k in rng.permutation(4)]
    factors = [None if r is None else float(rng.uniform(r[0], r[1])) for r in ranges]
    return order, factors


def apply_jitter(pil: Image.Image, order: Sequence[int], factors: Sequence[float | None]) -> Image.Image:
    """Apply the adjustments in ``order`` with ``factors`` (as :func:`sample_jitter` returns them)."""
    F = _functional()
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for k in order:
        if factors[k] is not None:
            pil = ops[k](pil, factors[k])
    return pil


def sample_resized_crop(rng: np.random.Generator, height: int, width: int, scale: Sequence[float],
                        ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params`` on ``rng``: the window ``(top, left, h, w)``.

    Up to 10 tries: an area ``U(scale) * height * width`` and an aspect ratio (w / h) log-uniform in ``ratio``,
    sides rounded; the first that fits the image is placed uniformly. Otherwise the central crop of the whole
    image, clamped to the ratio range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * float(rng.uniform(scale[0], scale[1]))
        aspect = math.exp(float(rng.uniform(log_lo, log_hi)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def gaussian_blur(pil: Image.Image, radius: float) -> Image.Image:
    """PIL's Gaussian blur with ``radius``."""
    return pil.filter(ImageFilter.GaussianBlur(radius=radius))


def solarize(pil: Image.Image, threshold: int = 128) -> Image.Image:
    """PIL's solarisation: every channel value ``v >= threshold`` becomes ``255 - v``."""
    return ImageOps.solarize(pil, threshold)


def _prob(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ToCoTrainTransform: `{name}` must be a probability in [0, 1]; got {value}")
    return value


def _pair(name: str, value: Sequence[float], low: float, high: float, what: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"ToCoTrainTransform: `{name}` must be a pair (low, high); got {value!r}") from None
    if not (low < lo <= hi <= high):
        raise ValueError(f"ToCoTrainTransform: `{name}` must be (low, high) with {what}; got {(lo, hi)}")
    return lo, hi


class ToCoTrainTransform:
    """ToCo's training transform: the augmented crop as the main image, plus a ``local`` view of the same crop and
    a ``view2`` resized crop of the original image (the module docstring describes the views and the quirks kept
    from the official code).

    Called like every transform, ``(img, label, rng)``, it returns a 4-tuple ``(img, label, img_box, views)``:
    ``img`` float32 (3, crop, crop) normalised, ``label`` int64 (crop, crop) or None and ``img_box`` int64 (4,) as
    :class:`~tscd.data.transforms.TrainTransform` returns them (box and label of the crop before the main image's
    photometric chain), and ``views`` ``{"view2": float32 (3, crop, crop), "local": float32 (3, crop, crop)}``,
    normalised. A dataset puts ``views`` into its item as ``item["views"]``.

    Args:
        crop_size, scale_range, flip_prob, img_pad_value: the crop (:class:`~tscd.data.transforms.TrainTransform`).
        view_flip_prob: the photometric chain's horizontal flip.
        jitter_prob: the colour jitter's probability; ``brightness``, ``contrast``, ``saturation``, ``hue``: its
            strengths (torchvision ``ColorJitter`` semantics, :func:`jitter_ranges`).
        grayscale_prob: the conversion to grey (three equal channels).
        main_blur_prob, local_blur_prob, view2_blur_prob: the Gaussian blur of each output.
        blur_radius: (low, high) of the uniform blur radius.
        solarize_prob: view2's solarisation (threshold 128).
        view2_scale: (low, high) of view2's area fraction; ``view2_ratio``: (low, high) of its aspect ratio.

    Raises:
        ValueError: a probability outside [0, 1], a bad range or strength (and the crop's own checks).
    """

    def __init__(self, crop_size: int = 512, scale_range: Sequence[float] = (0.5, 2.0), flip_prob: float = 0.5,
                 img_pad_value: str | Sequence[float] | float | None = None, *, view_flip_prob: float = 0.5,
                 jitter_prob: float = 0.8, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2,
                 hue: float = 0.1, grayscale_prob: float = 0.2, main_blur_prob: float = 1.0,
                 local_blur_prob: float = 0.5, view2_blur_prob: float = 0.1, blur_radius: Sequence[float] = (0.1, 2.0),
                 solarize_prob: float = 0.2, view2_scale: Sequence[float] = (0.4, 1.0),
                 view2_ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        self.crop = TrainTransform(crop_size, scale_range, flip_prob, img_pad_value)
        self.view_flip_prob = _prob("view_flip_prob", view_flip_prob)
        self.jitter_prob = _prob("jitter_prob", jitter_prob)
        self.grayscale_prob = _prob("grayscale_prob", grayscale_prob)
        self.main_blur_prob = _prob("main_blur_prob", main_blur_prob)
        self.local_blur_prob = _prob("local_blur_prob", local_blur_prob)
        self.view2_blur_prob = _prob("view2_blur_prob", view2_blur_prob)
        self.solarize_prob = _prob("solarize_prob", solarize_prob)
        self.jitter = (float(brightness), float(contrast), float(saturation), float(hue))
        self.jitter_ranges = jitter_ranges(*self.jitter)
        self.blur_radius = _pair("blur_radius", blur_radius, 0.0, math.inf, "0 < low <= high")
        self.view2_scale = _pair("view2_scale", view2_scale, 0.0, 1.0, "0 < low <= high <= 1")
        self.view2_ratio = _pair("view2_ratio", view2_ratio, 0.0, math.inf, "0 < low <= high")
        _functional()  # fail here, not in a loader worker, when torchvision is missing

    @property
    def crop_size(self) -> int:
        return self.crop.crop_size

    @property
    def img_pad_value(self) -> np.ndarray:
        return self.crop.img_pad_value

    def photometric(self, pil: Image.Image, rng: np.random.Generator) -> Image.Image:
        """The photometric chain: flip, colour jitter, grey (each behind its probability gate)."""
        if _gate(rng, self.view_flip_prob):
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if _gate(rng, self.jitter_prob):
            pil = apply_jitter(pil, *sample_jitter(rng, self.jitter_ranges))
        if _gate(rng, self.grayscale_prob):
            pil = _functional().rgb_to_grayscale(pil, num_output_channels=3)
        return pil

    def blur(self, pil: Image.Image, rng: np.random.Generator, p: float) -> Image.Image:
        """Gaussian blur with probability ``p`` and radius ``U(blur_radius)``."""
        if _gate(rng, p):
            pil = gaussian_blur(pil, float(rng.uniform(*self.blur_radius)))
        return pil

    def __call__(self, img: np.ndarray, label: np.ndarray | None, rng: np.random.Generator) -> ViewsTransformOutput:
        """Make the main image, its label and box, and the extra views of one image.

        Args:
            img: uint8 (H, W, 3), 0..255.
            label: uint8 (H, W) mask or None.
            rng: the item's random generator.

        Returns:
            ``(img, label, img_box, {"view2": ..., "local": ...})`` (see the class docstring).
        """
        crop, out_label, box = self.crop.crop_arrays(img, label, rng)
        crop_pil = Image.fromarray(np.clip(np.rint(crop), 0, 255).astype(np.uint8))
        local = self.blur(self.photometric(crop_pil, rng), rng, self.local_blur_prob)
        main = self.blur(self.photometric(crop_pil, rng), rng, self.main_blur_prob)
        view2 = self.view2(img, rng)
        views = {"view2": normalize(np.asarray(view2)), "local": normalize(np.asarray(local))}
        return normalize(np.asarray(main)), _label_tensor(out_label), box, views

    def view2(self, img: np.ndarray, rng: np.random.Generator) -> Image.Image:
        """view2 of the original uint8 image, before normalisation."""
        F = _functional()
        h, w = img.shape[:2]
        top, left, ch, cw = sample_resized_crop(rng, h, w, self.view2_scale, self.view2_ratio)
        size = self.crop_size
        pil = F.resized_crop(Image.fromarray(img), top, left, ch, cw, [size, size],
                             interpolation=F.InterpolationMode.BICUBIC)
        pil = self.blur(self.photometric(pil, rng), rng, self.view2_blur_prob)
        if _gate(rng, self.solarize_prob):
            pil = solarize(pil)
        return pil

    def __repr__(self) -> str:
        return (f"ToCoTrainTransform(crop={self.crop!r}, view_flip_prob={self.view_flip_prob}, "
                f"jitter_prob={self.jitter_prob}, jitter={self.jitter}, grayscale_prob={self.grayscale_prob}, "
                f"blur_prob=(main {self.main_blur_prob}, local {self.local_blur_prob}, view2 {self.view2_blur_prob}), "
                f"blur_radius={self.blur_radius}, solarize_prob={self.solarize_prob}, view2_scale={self.view2_scale}, "
                f"view2_ratio={self.view2_ratio})")
