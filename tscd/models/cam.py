"""Multi-scale class activation maps for pseudo labels (docs/method.md 3).

For each scale s: resize the batch bilinearly (``align_corners=False``) to ``(int(s*h), int(s*w))`` (scale 1 is
used as is), compute the CAMs of the image and of its horizontal flip, upsample them to ``(h, w)`` (bilinear,
``align_corners=False``), take the element-wise max of the CAM and the un-flipped flip-CAM, ReLU, and sum over
scales. Finally, per image and class, subtract the spatial min and divide by (spatial max + 1e-5).

The fast path un-flips the flip-CAM before upsampling it (the bilinear resize is mirror-symmetric; the weights of
mirrored pixels differ in the last bit, ~1e-6 of the CAM's range) and works in place on the full-size maps, whose
number grows with the class count (COCO: 80 per image).

* :func:`multi_scale_cam` (fast path): one :meth:`~tscd.models.tscd_net.TSCDNet.forward_cam` call per scale
  with image and flip concatenated on the batch axis; encoder + classifier only.
* :func:`multi_scale_cam_reference`: what the official code runs: per scale, the FULL training forward
  (decoder and affinity head included, results discarded) of the image and its flip, concatenated.

Mode: both use the model's current train/eval mode. The official training loop computes pseudo-label CAMs
with the model in train mode, so drop-path is active (CAMs in train mode are stochastic; compare the two paths
in eval mode) and, because its CAM passes run the whole network, the decoder's BatchNorm running statistics are
updated by every CAM pass (one pass per scale, image and flip concatenated on the batch axis). The fast path
reproduces that side effect with ``decoder=True``: :meth:`~tscd.models.segformer_head.SegFormerHead.track_statistics`
runs on the encoder features of each pass (only in train mode, where it changes state): the same running statistics
(to float rounding) and the same RNG draw as the discarded decoder forward, at about a fifth of its cost.
``decoder=False`` skips it (the decoder-free fast option: cheaper, but validation and test then use BN statistics
of the training forwards only). See docs/differences.md.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

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
    """Per image and class, in place: (cam - min) / (max(cam - min) + eps), over the spatial axes."""
    cam = cam.sub_(cam.amin(dim=(-2, -1), keepdim=True))
    return cam.div_(cam.amax(dim=(-2, -1), keepdim=True) + CAM_NORM_EPS)


def multi_scale_cam(model: nn.Module, images: Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5),
                    flip: bool = True, decoder: bool = False, affinity: bool = False,
                    cam_fn: Callable[[Tensor], Tensor] | None = None, separate_flip: bool = False,
                    known: dict[float, Tensor] | None = None,
                    encode_fn: Callable[..., tuple] | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-scale (+ flip) CAMs, normalised to [0, 1], without gradients: the fast path.

    Args:
        model: a :class:`~tscd.models.tscd_net.TSCDNet` (or DDP / torch.compile wrapper of one); its current mode
            is used.
        images: (B, 3, h, w) float, ImageNet-normalised, on the model's device.
        scales: resize factors; (1.0, 0.5, 1.5) in TSCD and AFA.
        flip: also use the horizontal flip (max-fused with the CAM).
        decoder: in train mode, also update the decoder's BatchNorm running statistics (and draw its dropout
            mask) from each pass's features as the official full-network CAM passes do, without forming the
            decoder's output (:meth:`~tscd.models.segformer_head.SegFormerHead.track_statistics`) (the trainer's
            default, ``pseudo.cam_decoder``); ignored in eval mode, where it would change nothing.
        affinity: also return the predicted affinity of the pass at the largest scale, for the un-flipped images
            (AFA's ``multi_scale_cam_with_aff_mat``): that pass runs the encoder with attention maps and the
            affinity head.
        cam_fn: the CAM logits of one pass's batch (default: the network's ``forward_cam``), e.g. ToCo's CAM and
            auxiliary CAM as one map of 2C channels (every step after it is per channel).
        separate_flip: run the image and its flip as two passes of B images (lower peak memory; with ``decoder``
            the BatchNorm statistics then see two half batches: ``pseudo.cam_flip: separate``).
        known: raw CAM logits (B, C, h16, w16) of the un-flipped images at some scales, computed elsewhere (the
            training forward's at scale 1: ``pseudo.cam_scale1: forward``); those scales' passes run the flip
            only (and, with ``decoder``, track statistics of the flip only).
        encode_fn: runs :func:`encode_pass` (same arguments), e.g. its compiled form (``train.compile: cams``);
            not used with ``cam_fn``.

    Returns:
        cam (B, C, h, w) float in [0, 1]; with ``affinity``, ``(cam, affinity)`` with affinity (B, N, N), N the
        positions of the largest scale's 1/16 grid.

    Raises:
        ValueError: bad ``images`` shape or ``scales``.
    """
    _check(images, scales, "multi_scale_cam")
    net = _unwrap(model, "multi_scale_cam")
    b, _, h, w = images.shape
    total = aff = None
    with torch.no_grad():
        for s in scales:
            with record_function(f"tscd/cam_pass/scale={s:g}"):
                want_aff = affinity and aff is None and s == max(scales)
                x, dec = _resize(images, s), decoder and net.training
                if known is not None and s in known and flip and not want_aff:
                    cam = torch.cat([known[s], _cam_pass(net, x.flip(-1), b, False, dec, False, cam_fn, encode_fn)[0]])
                    pass_aff = None
                elif separate_flip and flip:
                    cam, pass_aff = _cam_pass(net, x, b, False, dec, want_aff, cam_fn, encode_fn)
                    cam = torch.cat([cam, _cam_pass(net, x.flip(-1), b, False, dec, False, cam_fn, encode_fn)[0]])
                else:
                    cam, pass_aff = _cam_pass(net, x, b, flip, dec, want_aff, cam_fn, encode_fn)
                aff = pass_aff if want_aff else aff
                if flip:  # the flip's CAM mirrored back at its own (1/16) resolution: no full-size flip
                    cam = torch.cat([cam[:b], cam[b:].flip(-1)])
                cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
                if flip:  # into the image half, in place, once a sum exists (full-size maps: C of them per image)
                    cam = torch.maximum(cam[:b], cam[b:], out=None if total is None else cam[:b])
                cam = cam.clamp_min_(0.0)  # ReLU
                total = cam if total is None else total.add_(cam)
        return (_normalise(total), aff) if affinity else _normalise(total)


def _cam_pass(net: nn.Module, x: Tensor, b: int, flip: bool, decoder: bool, affinity: bool,
              cam_fn: Callable[[Tensor], Tensor] | None = None,
              encode_fn: Callable[..., tuple] | None = None) -> tuple[Tensor, Tensor | None]:
    """One scale's pass of :func:`multi_scale_cam`: the CAM logits of ``x`` (and its flip, concatenated on the
    batch axis), the decoder's side effects, and the affinity of the first ``b`` images when asked."""
    if flip:
        x = torch.cat([x, x.flip(-1)], dim=0)
    if cam_fn is not None:
        return cam_fn(x), None
    cam, feats, aff = (encode_fn or encode_pass)(net, x, b, decoder, affinity)
    if decoder:
        with record_function("tscd/cam_pass/decoder_stats"):
            net.decoder.track_statistics(feats)  # the official full pass's side effects only (BN, RNG)
    return cam, aff


def encode_pass(net: nn.Module, x: Tensor, b: int, feats: bool, affinity: bool
                ) -> tuple[Tensor, list[Tensor] | None, Tensor | None]:
    """The encoder work of one CAM pass, what ``train.compile: cams`` compiles
    (:class:`tscd.models._compile.StaticCompiled`; it changes no module state, the decoder's BatchNorm update
    stays outside).

    Returns:
        ``(cam, feats, affinity)``: the CAM logits of ``x``; with ``feats`` the encoder maps, else None; with
        ``affinity`` the affinity head's output for the first ``b`` images, else None.
    """
    if not (feats or affinity):
        return net.forward_cam(x), None, None
    maps, attns = net.encoder.forward_features(x, net.affinity_attn_blocks if affinity else None)
    return net.classifier(maps[3]), (maps if feats else None), (net.affinity_head(attns)[:b] if affinity else None)


def multi_scale_cam_reference(model: nn.Module, images: Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5),
                              flip: bool = True, affinity: bool = False,
                              cam_of: Callable[[Any], Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Multi-scale CAMs as the official code computes them: per scale, one full training forward of the image
    and its flip concatenated on the batch axis (decoder and affinity head included, their outputs discarded).

    Same CAMs as :func:`multi_scale_cam` (exactly, up to float rounding, in eval mode) and, in train mode, the
    same BatchNorm side effects as ``multi_scale_cam(..., decoder=True)``, at the cost of the official
    implementation. Used by ``train.reference_style``, parity tests and benchmarks.

    Args:
        model: a TSCDNet whose ``forward(img)`` returns an output with a ``cam`` field.
        images: (B, 3, h, w) float.
        scales: resize factors.
        flip: also use the horizontal flip.
        affinity: also return the affinity of the largest scale's pass, un-flipped images (as
            :func:`multi_scale_cam`).
        cam_of: the CAM logits of a pass's output (default: its ``cam`` field).

    Returns:
        cam (B, C, h, w) float in [0, 1]; with ``affinity``, ``(cam, affinity)``.
    """
    _check(images, scales, "multi_scale_cam_reference")
    h, w = images.shape[-2:]
    cams = []
    aff = None
    with torch.no_grad():
        b = images.shape[0]
        for s in scales:
            x = _resize(images, s)
            if flip:
                x = torch.cat([x, x.flip(-1)], dim=0)
            with record_function(f"tscd/cam_pass/scale={s:g}"):
                out = model(x)
            if affinity and aff is None and s == max(scales):
                aff = out.affinity[:b]
            cam = F.interpolate(out.cam if cam_of is None else cam_of(out), size=(h, w), mode="bilinear",
                                align_corners=False)
            if flip:
                cam = torch.max(cam[:b], cam[b:].flip(-1))
            cams.append(F.relu(cam))
        cam = torch.stack(cams, dim=0).sum(dim=0)
        cam = cam + F.adaptive_max_pool2d(-cam, (1, 1))
        cam = cam / (F.adaptive_max_pool2d(cam, (1, 1)) + CAM_NORM_EPS)
        return (cam, aff) if affinity else cam
