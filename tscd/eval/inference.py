"""Loading a trained checkpoint and running single- and multi-scale (+ flip) inference (docs/method.md 6).

Multi-scale + flip test (AFA's ``test_msc_flip.py``): the image is resized so that its long side is ``resize_long``
(512); for each scale s the batch is resized bilinearly to ``(int(s*h), int(s*w))`` and run *together with its
horizontal flip* (one forward per scale, image and flip concatenated on the batch axis). Segmentation logits of each
scale are resized to the scale-1 logits' size (1/4 of the input), the flip is un-flipped and averaged with the image,
and the element-wise **max over scales** is taken. CAMs of the CAM scales come out of the same passes (a scale that
only the CAM needs runs the CAM-only forward) and are fused as :func:`tscd.models.multi_scale_cam` does (max of image
and un-flipped flip, ReLU, sum over scales, per-map min-max normalisation), so no scale runs twice.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tscd.config import Config, ConfigError, apply_overrides, config_from_dict, resolve_config
from tscd.errors import CheckpointError
from tscd.method.recipes import find_recipe
from tscd.models import MIT_CONFIGS, MODEL_CONFIGS, TSCD_STRIDES, MixVisionTransformer, TSCDNet, create_model
from tscd.models._checkpoint import check_state_dict, read_checkpoint, strip_prefixes, unwrap_state_dict
from tscd.models.cam import CAM_NORM_EPS

logger = logging.getLogger(__name__)

#: AFA's test scales for the segmentation head (docs/method.md 6).
DEFAULT_SEG_SCALES: tuple[float, ...] = (1.0, 0.5, 0.75)
#: Long side of the resized test image.
DEFAULT_RESIZE_LONG: int = 512


@dataclass
class LoadedModel:
    """A model rebuilt from a checkpoint.

    Attributes:
        model: the :class:`TSCDNet`, in eval mode, on the requested device.
        config: the training config stored in the checkpoint, with any overrides applied, resolved for the device
            (:func:`tscd.config.resolve_config`, as training resolved it: e.g. ``train.amp``).
        num_classes: foreground classes C.
        iteration: training iteration of the checkpoint (None if not stored).
        path: the checkpoint file.
    """

    model: TSCDNet
    config: Config
    num_classes: int
    iteration: int | None
    path: Path


def _read(path: Path) -> dict:
    """Read a checkpoint without running code from it (trainer checkpoints hold only tensors and plain values)."""
    try:
        return read_checkpoint(path)
    except FileNotFoundError:
        raise
    except RuntimeError as err:  # UnsafeCheckpointError included: its message says why it was refused
        raise CheckpointError(str(err)) from None


def load_model(checkpoint: str | os.PathLike, device: torch.device | str = "cpu",
               overrides: Sequence[str] = ()) -> LoadedModel:
    """Rebuild a :class:`TSCDNet` from a checkpoint written by ``tscd train`` (or a bare state dict).

    The architecture comes from the checkpoint's ``config`` (``model.name``, ``decoder_dim``, ``pooling``,
    ``symmetric_affinity``) and ``num_classes``; ``overrides`` (``section.key=value``) are applied on top. A bare
    state dict (no ``config``) uses the default config plus ``overrides`` and takes C from ``classifier.weight``.

    Args:
        checkpoint: local path of the checkpoint file.
        device: where to put the model.
        overrides: config overrides, e.g. ``["model.name=tscd_mit_b1"]``.

    Returns:
        A :class:`LoadedModel` (model in eval mode).

    Raises:
        FileNotFoundError: the file does not exist.
        RuntimeError: the file is unreadable.
        ValueError: the weights do not fit the architecture described by the config (names the keys).
    """
    path = Path(checkpoint)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {str(path)!r} {what} (`--checkpoint`); checkpoints of a run are in "
                                f"<run_dir>/checkpoints/ckpt_XXXXXXX.pt")
    raw = _read(path)
    state = strip_prefixes(unwrap_state_dict(raw))
    try:
        cfg = config_from_dict(raw["config"], f"checkpoint {path}") if isinstance(raw.get("config"), dict) else Config()
        apply_overrides(cfg, list(overrides))
        # the resolution training used (not validated as a whole: only the model and label sections matter here)
        cfg, _ = resolve_config(cfg, torch.device(device), int(os.environ.get("WORLD_SIZE", "1")), check=False)
    except ConfigError as err:
        raise ValueError(f"checkpoint {str(path)!r}: config not usable: {err}") from None
    num_classes = raw.get("num_classes")
    if num_classes is None:
        if "classifier.weight" not in state:
            raise ValueError(f"checkpoint {str(path)!r} has neither `num_classes` nor a `classifier.weight` tensor")
        num_classes = int(state["classifier.weight"].shape[0])
    m = cfg.model
    model = _build(cfg, int(num_classes))
    try:
        check_state_dict(model, state, f"TSCDNet {m.name} with {num_classes} classes")
    except ValueError as err:
        raise ValueError(f"checkpoint {str(path)!r}: {err}") from None
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    iteration = raw.get("iteration")
    logger.info("loaded %s (%s, %d classes, iteration %s)", path, m.name, num_classes, iteration)
    return LoadedModel(model, cfg, int(num_classes), iteration, path)


def _build(cfg: Config, num_classes: int) -> TSCDNet:
    """The architecture of ``cfg.model`` without any weights (the full state dict is loaded right after); a recipe
    with a network of its own (ToCo's ViT) builds it."""
    m = cfg.model
    recipe = find_recipe(cfg.recipe)
    if recipe is not None and "build_network" in vars(recipe):
        cfg = copy.deepcopy(cfg)
        cfg.model.pretrained = None
        return recipe.build_network(cfg, num_classes)
    if m.name not in MODEL_CONFIGS:
        return create_model(m.name)  # raises the factory's error, naming the closest valid model
    encoder = MixVisionTransformer(**{**MIT_CONFIGS[MODEL_CONFIGS[m.name]], "strides": TSCD_STRIDES})
    return TSCDNet(encoder, num_classes=num_classes, pooling=m.pooling, decoder_dim=m.decoder_dim,
                   symmetric_affinity=m.symmetric_affinity)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> the current CUDA device if there is one, else CPU; otherwise ``torch.device(name)``.

    Raises:
        ValueError: an unknown name, or CUDA asked for where there is none.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"`--device` must be auto, cpu, cuda or cuda:N; got {name!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`--device {name}`: no CUDA GPU is visible here; use --device cpu")
    return device


def resize_long(img: Tensor, long_side: int | None) -> Tensor:
    """Resize (B, 3, H, W) bilinearly so that max(H, W) becomes ``long_side`` (aspect kept; sizes floored).

    ``None`` or 0 returns the input unchanged.
    """
    if not long_side:
        return img
    h, w = img.shape[-2:]
    ratio = long_side / max(h, w)
    size = (max(1, int(h * ratio)), max(1, int(w * ratio)))
    if size == (h, w):
        return img
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False)


@dataclass
class MultiScaleOutput:
    """What :func:`forward_multi_scale` computed, for a batch (B, 3, H, W).

    Attributes:
        seg_logits: (B, C+1, ceil(H/4), ceil(W/4)) single-scale logits (scale 1, image only).
        seg_ms: (B, C+1, ceil(H/4), ceil(W/4)) multi-scale (+ flip) logits, or None if not asked for.
        cam: (B, C, H, W) multi-scale (+ flip) CAM in [0, 1], or None if not asked for.
        affinity: (B, N, N) predicted affinity of the scale-1 image, N = ceil(H/16) * ceil(W/16).
        cls_logits: (B, C) classification logits of the scale-1 image.
    """

    seg_logits: Tensor
    seg_ms: Tensor | None
    cam: Tensor | None
    affinity: Tensor
    cls_logits: Tensor


def _check_scales(scales: Sequence[float], what: str) -> None:
    if len(scales) == 0 or any(float(s) <= 0 for s in scales):
        raise ValueError(f"forward_multi_scale: `{what}` must be a non-empty list of positive numbers; got "
                         f"{list(scales)}")


@torch.no_grad()
def forward_multi_scale(model: TSCDNet, img: Tensor, *, seg_scales: Sequence[float] | None = DEFAULT_SEG_SCALES,
                        cam_scales: Sequence[float] | None = (1.0, 0.5, 1.5), flip: bool = True) -> MultiScaleOutput:
    """Segmentation logits, CAMs and affinity of a batch, with one forward per scale (module docstring).

    Args:
        model: a :class:`TSCDNet` in eval mode.
        img: (B, 3, H, W) ImageNet-normalised float on the model's device (already resized, see :func:`resize_long`).
        seg_scales: scales of the multi-scale segmentation; None skips ``seg_ms``.
        cam_scales: scales of the multi-scale CAM; None skips ``cam``.
        flip: use the horizontal flip (averaged for segmentation, max-fused for CAMs).

    Returns:
        :class:`MultiScaleOutput`.

    Raises:
        ValueError: bad ``img`` shape or scales.
    """
    if img.ndim != 4 or img.shape[1] != 3:
        raise ValueError(f"forward_multi_scale: `img` must be (B, 3, H, W); got shape {tuple(img.shape)}")
    if seg_scales is not None:
        _check_scales(seg_scales, "seg_scales")
    if cam_scales is not None:
        _check_scales(cam_scales, "cam_scales")
    b, _, h, w = img.shape
    seg_set = [1.0] + [float(s) for s in (seg_scales or ()) if float(s) != 1.0]
    seg_ms_set = [float(s) for s in (seg_scales or ())]
    cam_set = [float(s) for s in (cam_scales or ())]
    scales = list(dict.fromkeys(seg_set + cam_set))  # scale 1 first, each scale once
    seg_ref = seg_ms = cam_sum = affinity = cls_logits = None
    for s in scales:
        x = img if s == 1.0 else F.interpolate(img, size=(int(s * h), int(s * w)), mode="bilinear",
                                               align_corners=False)
        xb = torch.cat([x, x.flip(-1)], dim=0) if flip and (s in cam_set or s in seg_ms_set) else x
        if s in seg_set:
            out = model(xb)
            cam = out.cam
            logits = out.seg_logits.float()
            if s == 1.0:
                seg_ref, cls_logits = logits[:b], out.cls_logits[:b]
                affinity = None if out.affinity is None else out.affinity[:b]
            if s in seg_ms_set:
                if logits.shape[-2:] != seg_ref.shape[-2:]:
                    logits = F.interpolate(logits, size=seg_ref.shape[-2:], mode="bilinear", align_corners=False)
                if xb.shape[0] != b:
                    logits = (logits[:b] + logits[b:].flip(-1)) / 2
                seg_ms = logits if seg_ms is None else torch.maximum(seg_ms, logits)
        else:
            cam = model.forward_cam(xb)
        if s in cam_set:
            cam = F.interpolate(cam.float(), size=(h, w), mode="bilinear", align_corners=False)
            if xb.shape[0] != b:
                cam = torch.maximum(cam[:b], cam[b:].flip(-1))
            cam = F.relu(cam)
            cam_sum = cam if cam_sum is None else cam_sum + cam
    cam_out = None
    if cam_sum is not None:
        cam_out = cam_sum - cam_sum.amin(dim=(-2, -1), keepdim=True)
        cam_out = cam_out / (cam_out.amax(dim=(-2, -1), keepdim=True) + CAM_NORM_EPS)
    return MultiScaleOutput(seg_ref, seg_ms, cam_out, affinity, cls_logits)
