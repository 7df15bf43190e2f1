"""Multi-scale class activation maps for pseudo labels (docs/method.md 3).

For each scale s: resize the batch bilinearly (``align_corners=False``) to ``(int(s*h), int(s*w))`` (scale 1 is
used as is), compute the CAMs of the image and of its horizontal flip, upsample them to ``(h, w)`` (bilinear,
``align_corners=False``), take the element-wise max of the CAM and the un-flipped flip-CAM, ReLU, and sum over
scales. Finally, per image and class, subtract the spatial min and divide by (spatial max + 1e-5).

* :func:`multi_scale_cam` (fast path): one :meth:`~tscd.models.tscd_net.TSCDNet.forward_cam` call per scale
  with image and flip concatenated on the batch axis; encoder + classifier only.
* :func:`multi_scale_cam_reference`: what the official code costs: per scale, the FULL training forward
  (decoder and affinity head included, results discarded), separately for the image and for its flip.

Mode: both use the model's current train/eval mode. The reference training loop computes pseudo-label CAMs
with the model in train mode; on the CAM path only drop-path depends on the mode (no BatchNorm or dropout there),
so CAMs in train mode are stochastic. Compare the two paths in eval mode. Unlike the reference, the fast path does
not update the decoder's BatchNorm running statistics during CAM passes (the reference does, as a side effect of
running the decoder in train mode on the extra scales and flips).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tscd.models.tscd_net import _unwrap

#: Added to the per-map maximum before dividing (docs/method.md 3).
CAM_NORM_EPS: float = 1e-5


def _check(images: Tensor, scales: Sequence[float], op: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"{op}: `images` must be a 4-D tensor (B, 3, h, w); got shape {tuple(images.shape)}")
    if len(scales) == 0 or any(s <= 0 for s in scales):
        raise ValueError(f"{op}: `scales` must be a non-empty sequence of positive floats; got {scales!r}")


def _resize(images: Tensor, scale: float) -> Tensor:
    h, w = images.shape[-2:]
    size = (int(scale * h), int(scale * w))
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def _normalise(cam: Tensor) -> Tensor:
    """Per image and class: (cam - min) / (max(cam - min) + eps), over the spatial axes."""
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + CAM_NORM_EPS)


def multi_scale_cam(model: nn.Module, images: Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5),
                    flip: bool = True) -> Tensor:
    """Multi-scale (+ flip) CAMs, normalised to [0, 1], without gradients: the fast path.

    Args:
        model: a :class:`~tscd.models.tscd_net.TSCDNet` (or DDP / torch.compile wrapper of one); its current mode
            is used.
        images: (B, 3, h, w) float, ImageNet-normalised, on the model's device.
        scales: resize factors; (1.0, 0.5, 1.5) in TSCD and AFA.
        flip: also use the horizontal flip (max-fused with the CAM).

    Returns:
        cam (B, C, h, w) float in [0, 1].

    Raises:
        ValueError: bad ``images`` shape or ``scales``.
    """
    _check(images, scales, "multi_scale_cam")
    net = _unwrap(model, "multi_scale_cam")
    b, _, h, w = images.shape
    total = None
    with torch.no_grad():
        for s in scales:
            x = _resize(images, s)
            if flip:
                x = torch.cat([x, x.flip(-1)], dim=0)
            cam = F.interpolate(net.forward_cam(x), size=(h, w), mode="bilinear", align_corners=False)
            if flip:
                cam = torch.maximum(cam[:b], cam[b:].flip(-1))
            cam = F.relu(cam)
            total = cam if total is None else total + cam
        return _normalise(total)


def multi_scale_cam_reference(model: nn.Module, images: Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5),
                              flip: bool = True) -> Tensor:
    """Reference-cost multi-scale CAMs: full training forward per scale, image and flip separately.

    Same result as :func:`multi_scale_cam` (exactly, up to float rounding, in eval mode), at the cost of the
    official implementation: the decoder and the affinity head run and their outputs are thrown away. Kept for
    parity tests and benchmarks.

    Args:
        model: a TSCDNet whose ``forward(img)`` returns an output with a ``cam`` field.
        images: (B, 3, h, w) float.
        scales: resize factors.
        flip: also use the horizontal flip.

    Returns:
        cam (B, C, h, w) float in [0, 1].
    """
    _check(images, scales, "multi_scale_cam_reference")
    h, w = images.shape[-2:]
    cams = []
    with torch.no_grad():
        for s in scales:
            x = _resize(images, s)
            cam = F.interpolate(model(x).cam, size=(h, w), mode="bilinear", align_corners=False)
            if flip:
                cam_flip = F.interpolate(model(x.flip(-1)).cam, size=(h, w), mode="bilinear", align_corners=False)
                cam = torch.max(cam, cam_flip.flip(-1))
            cams.append(F.relu(cam))
        cam = torch.stack(cams, dim=0).sum(dim=0)
        cam = cam + F.adaptive_max_pool2d(-cam, (1, 1))
        return cam / (F.adaptive_max_pool2d(cam, (1, 1)) + CAM_NORM_EPS)
