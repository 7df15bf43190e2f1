"""The method's label logic (docs/method.md): CAM -> label, VARM/PAR pseudo labels, affinity labels, AFA's
affinity-propagated labels.

Used by training (the losses' targets) and by evaluation (the ``cam`` and ``pseudo`` outputs), so it lives
here, below both.

Pseudo labels (:func:`refine_cams_with_bkg`): the official code refines each image twice (background
scores 0.55 and 0.35), one call at a time, on the [background, present classes] channels of that image.
Here both thresholds of every image go through one batched ``refine`` call: the weights depend on the
image only, so the two stacks are channels of the same call. Every image keeps all 1 + C channels, the
channels of absent classes are set to -inf before the softmax (so they are exactly 0, as if dropped) and
masked out of the argmax; refinement is linear per channel, so the kept channels get the official values.
Nothing in this path reads a tensor's value on the host (no ``.item()``, no ``nonzero()``): a training step
on a GPU does not wait for the pseudo labels. (AFA's propagated label, :func:`refine_propagated_cams`, refines each
image's box at its own size and does read the boxes.)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tscd.constants import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from tscd.kernels import refine
from tscd.method.random_walk import RW_RADIUS, propagate_cam_with_bkg


def box_mask(img_box: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4) [top, bottom, left, right) boxes -> (B, H, W) bool, True inside."""
    ys = torch.arange(height, device=img_box.device).view(1, -1, 1)
    xs = torch.arange(width, device=img_box.device).view(1, 1, -1)
    top, bottom, left, right = (img_box[:, i].view(-1, 1, 1) for i in range(4))
    return (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)


def varm_image(img: torch.Tensor, truncate: bool = True) -> torch.Tensor:
    """The image VARM/PAR sees: de-normalised to [0, 1], by default truncated to uint8 first (as the official code).

    The official code computes ``(img * std + mean).to(uint8) / 255``: the float image on the 0..255 scale is
    truncated towards zero (254.99 -> 254) before the division. ``truncate=False`` keeps the float image
    (``(img * std + mean) / 255``). Both are clamped to [0, 1] (the cast of a value outside 0..255 is
    undefined; in-range values are unaffected).

    Args:
        img: (B, 3, H, W) float, ImageNet-normalised, any device.
        truncate: truncate to integers on the 0..255 scale (default, official) or not.

    Returns:
        (B, 3, H, W) float32 in [0, 1].

    Raises:
        ValueError: ``img`` is not (B, 3, H, W).
    """
    if img.dim() != 4 or img.shape[1] != 3:
        raise ValueError(f"varm_image: `img` must be (B, 3, H, W); got shape {tuple(img.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=img.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=img.device).view(1, 3, 1, 1)
    x = (img.float() * std + mean).clamp_(0.0, 255.0)
    if truncate:
        x = x.to(torch.uint8).float()
    return x / 255.0


def refine_cams_with_bkg(image01: torch.Tensor, cams: torch.Tensor, cls_label: torch.Tensor,
                         img_box: torch.Tensor | None = None, *, bkg_high: float = 0.55, bkg_low: float = 0.35,
                         scale: float = 0.5, mode: str = "varm", num_iter: int = 10,
                         dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), backend: str = "auto") -> torch.Tensor:
    """VARM-refined pseudo labels with two background thresholds (docs/method.md), without host syncs.

    Args:
        image01: (B, 3, H, W) de-normalised images in [0, 1] (:func:`varm_image`).
        cams: (B, C, H, W) multi-scale CAMs in [0, 1] (no grad needed).
        cls_label: (B, C) multi-hot image labels.
        img_box: (B, 4) int64 [top, bottom, left, right) real-image region; None = the whole crop.
        bkg_high, bkg_low: the constant background scores of the two runs (0.55, 0.35).
        scale: refinement resolution as a fraction of (H, W) (0.5 in the official code).
        mode, num_iter, dilations, backend: of :func:`tscd.kernels.refine`.

    Returns:
        (B, H, W) int64: class ids 1..C where the high run says foreground; 255 where only the high
        run says background; 0 where both say background; 255 outside ``img_box``.
    """
    B, C, H, W = cams.shape
    h, w = max(1, int(H * scale)), max(1, int(W * scale))
    img_s = F.interpolate(image01.float(), size=(h, w), mode="bilinear", align_corners=False)
    cams_s = F.interpolate(cams.float(), size=(h, w), mode="bilinear", align_corners=False)
    # channel k of a stack is class id k (0 = background); absent classes are dropped by the -inf mask
    keep = torch.cat([torch.ones_like(cls_label[:, :1], dtype=torch.bool), cls_label > 0.5], dim=1)
    drop = ~keep.view(B, C + 1, 1, 1)
    stacks = []
    for bkg in (bkg_high, bkg_low):
        with_bkg = torch.cat([torch.full_like(cams_s[:, :1], bkg), cams_s], dim=1)  # (B, 1+C, h, w)
        stacks.append(with_bkg.masked_fill(drop, float("-inf")).softmax(dim=1))  # 0 on dropped channels
    # one call for the batch and both thresholds, on each image's present channels only (about 8 of VOC's 42,
    # COCO's 162): they are moved to the front, their count passed on the device (no host sync), the rest
    # skipped by the kernels; every channel is refined independently, so the present ones are unchanged
    perm, n_valid = _present_first(keep)
    stack = torch.cat(stacks, dim=1)
    stack = stack.gather(1, perm.view(B, -1, 1, 1).expand(-1, -1, h, w))
    refined = refine(img_s, stack, dilations=dilations, num_iter=num_iter, mode=mode, num_channels=n_valid,
                     backend=backend)  # (B, 2 (1+C), h, w), present channels first
    # absent channels can never win the argmax: the lowest finite value (not -inf: the resize's zero weights
    # would make 0 * -inf = NaN), set at the refine resolution, in place
    skipped = torch.arange(2 * (C + 1), device=cams.device).view(1, -1) >= n_valid.view(-1, 1)
    refined.masked_fill_(skipped.view(B, -1, 1, 1), torch.finfo(refined.dtype).min)
    refined = refined.gather(1, perm.argsort(dim=1).view(B, -1, 1, 1).expand(-1, -1, h, w))  # back in class order
    # resized channels-last: the argmax over channels then reads contiguous memory
    refined = F.interpolate(refined.contiguous(memory_format=torch.channels_last), size=(H, W), mode="bilinear",
                            align_corners=False)
    high = refined[:, :C + 1].argmax(1)
    low = refined[:, C + 1:].argmax(1)
    label = torch.where(high == 0, torch.where(low == 0, 0, IGNORE_INDEX), high)
    if img_box is not None:
        label = label.masked_fill(~box_mask(img_box, H, W), IGNORE_INDEX)
    return label


def _present_first(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The channel order that puts each image's present channels of both stacked thresholds first.

    Args:
        keep: (B, K) bool, the present channels (background included) of one threshold's stack.

    Returns:
        ``(perm, n)``: perm (B, 2K) int64, the channels of ``cat([high, low], 1)`` in the order: present
        channels of the high stack, present channels of the low stack (class order within each), then the
        absent ones; n (B,) int64 = 2 * present, on the device (no host sync).
    """
    B, K = keep.shape
    k = torch.arange(2 * K, device=keep.device)
    absent = ~keep.repeat(1, 2)  # (B, 2K): channel c of the concatenation is class c % K of stack c // K
    perm = (absent.long() * 2 * K + k).argsort(dim=1)
    return perm, 2 * keep.sum(dim=1)


def refine_cams_with_bkg_sequential(image01: torch.Tensor, cams: torch.Tensor, cls_label: torch.Tensor,
                                    img_box: torch.Tensor | None = None, *, bkg_high: float = 0.55,
                                    bkg_low: float = 0.35, scale: float = 0.5, mode: str = "varm",
                                    num_iter: int = 10, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24),
                                    backend: str = "torch") -> torch.Tensor:
    """The official structure (for ``train.reference_style``, benchmarks and tests): one refine call per image
    and threshold, on that image's [background, present classes] channels.

    Same arguments and result as :func:`refine_cams_with_bkg`.
    """
    B, C, H, W = cams.shape
    h, w = max(1, int(H * scale)), max(1, int(W * scale))
    img_s = F.interpolate(image01.float(), size=(h, w), mode="bilinear", align_corners=False)
    out = torch.full((B, H, W), IGNORE_INDEX, dtype=torch.long, device=cams.device)
    for b in range(B):
        present = (cls_label[b] > 0.5).nonzero()[:, 0] + 1
        keys = torch.cat([torch.zeros(1, dtype=torch.long, device=cams.device), present])
        labels = []
        for bkg in (bkg_high, bkg_low):
            stack = torch.cat([torch.full_like(cams[b:b + 1, :1], bkg), cams[b:b + 1].float()], 1)
            stack = F.interpolate(stack, size=(h, w), mode="bilinear", align_corners=False)[:, keys].softmax(1)
            ref = refine(img_s[b:b + 1], stack, dilations=dilations, num_iter=num_iter, mode=mode, backend=backend)
            ref = F.interpolate(ref, size=(H, W), mode="bilinear", align_corners=False)
            labels.append(keys[ref.argmax(1)][0])
        high, low = labels
        lab = high.clone()
        lab[high == 0] = IGNORE_INDEX
        lab[(high == 0) & (low == 0)] = 0
        out[b] = lab
    if img_box is not None:
        out[~box_mask(img_box, H, W)] = IGNORE_INDEX
    return out


def refine_propagated_cams(image01: torch.Tensor, cams: torch.Tensor, aff: torch.Tensor, cls_label: torch.Tensor,
                           img_box: torch.Tensor, grid: tuple[int, int], *, bkg_high: float = 0.55,
                           bkg_low: float = 0.35, radius: int = RW_RADIUS, mode: str = "par", num_iter: int = 10,
                           dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), backend: str = "auto") -> torch.Tensor:
    """AFA's segmentation label after its switch: CAMs propagated by the predicted affinity, refined inside each
    image's box, with two background scores.

    1. For each background score (``bkg_high``, ``bkg_low``): the random walk of [background, CAM] with the
       affinity (:func:`tscd.method.random_walk.propagate_cam_with_bkg` on ``grid``), resized to (H, W)
       bilinearly.
    2. Per image, inside ``img_box`` only: the box of the image, resized to half its size, refines both score
       stacks (their box crops; ``mode``, PAR in AFA), resized back to the box.
    3. Argmax over the image's classes per stack; the label is the high run's class where it says foreground,
       0 where both say background, 255 where only the high run does, and 255 outside the box.

    The boxes differ in size, so this reads ``img_box`` on the host and makes one refine call per image (both
    stacks in one call), as the official code does.

    Args:
        image01: (B, 3, H, W) images in [0, 1] (:func:`varm_image`).
        cams: (B, C, H, W) multi-scale CAMs in [0, 1].
        aff: (B, N, N) predicted affinity on ``grid`` (AFA: of the largest-scale CAM pass).
        cls_label: (B, C) multi-hot image labels.
        img_box: (B, 4) int64 [top, bottom, left, right).
        grid: the affinity's (h, w), h * w = N.
        bkg_high, bkg_low: background scores of the two walks (AFA: cam.high_thre 0.55, cam.low_thre 0.35).
        radius: Chebyshev radius of the walk's mask (8).
        mode, num_iter, dilations, backend: of :func:`tscd.kernels.refine`.

    Returns:
        (B, H, W) int64 labels (0..C, 255).
    """
    B, C, H, W = cams.shape
    stacks = [F.interpolate(propagate_cam_with_bkg(cams, aff, cls_label, bkg=bkg, radius=radius, grid=grid),
                            size=(H, W), mode="bilinear", align_corners=False) for bkg in (bkg_high, bkg_low)]
    scores = torch.cat(stacks, dim=1)  # (B, 2 (1+C), H, W); absent classes are 0
    keep = torch.cat([torch.ones_like(cls_label[:, :1], dtype=torch.bool), cls_label > 0.5], dim=1)
    label = torch.full((B, H, W), IGNORE_INDEX, dtype=torch.long, device=cams.device)
    for b, (top, bottom, left, right) in enumerate(img_box.tolist()):
        crop = image01[b:b + 1, :, top:bottom, left:right].float()
        h, w = crop.shape[-2:]
        small = F.interpolate(crop, size=(max(1, h // 2), max(1, w // 2)), mode="bilinear", align_corners=False)
        ref = refine(small, scores[b:b + 1, :, top:bottom, left:right].contiguous(), dilations=dilations,
                     num_iter=num_iter, mode=mode, backend=backend)
        ref = F.interpolate(ref, size=(h, w), mode="bilinear", align_corners=False)
        drop = ~keep[b].view(1, C + 1, 1, 1)
        high = ref[:, :C + 1].masked_fill(drop, float("-inf")).argmax(1)[0]
        low = ref[:, C + 1:].masked_fill(drop, float("-inf")).argmax(1)[0]
        label[b, top:bottom, left:right] = torch.where(high == 0, torch.where(low == 0, 0, IGNORE_INDEX), high)
    return label


def cam_to_label(cams: torch.Tensor, cls_label: torch.Tensor, bkg: float = 0.45) -> torch.Tensor:
    """Unrefined CAM label: argmax over present classes, background where the max score <= ``bkg``.

    Args:
        cams: (B, C, H, W) CAMs in [0, 1]. cls_label: (B, C) multi-hot. bkg: background threshold.

    Returns:
        (B, H, W) int64 labels in 0..C.
    """
    scores, idx = (cams * cls_label[:, :, None, None]).max(dim=1)
    return (idx + 1).masked_fill(scores <= bkg, 0)


def affinity_label(label: torch.Tensor, size: tuple[int, int], radius: int = 8) -> torch.Tensor:
    """Pairwise affinity targets on the stage-4 grid (docs/method.md), vectorised.

    The label is nearest-resized to ``size`` and flattened; pair (u, v) is 1 for the same label,
    0 for different labels, 255 if either is 255 or their Chebyshev distance exceeds ``radius``.

    Returns:
        (B, N, N) uint8 with N = size[0] * size[1].
    """
    h, w = size
    small = F.interpolate(label.unsqueeze(1).float(), size=(h, w), mode="nearest").view(label.shape[0], -1).long()
    ys, xs = torch.meshgrid(torch.arange(h, device=label.device), torch.arange(w, device=label.device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    far = torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs()) > radius
    same = (small[:, :, None] == small[:, None, :]).to(torch.uint8)
    ignore = (small[:, :, None] == IGNORE_INDEX) | (small[:, None, :] == IGNORE_INDEX) | far.unsqueeze(0)
    return same.masked_fill(ignore, IGNORE_INDEX)
