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
    """VARM-refined pseudo labels with two background thresholds (docs/method.md), without host syncs on a GPU
    (on the CPU the largest present-class count of the batch is read on the host, where a read costs nothing).

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
    # channel k of a stack is class id k (0 = background). Only present classes are handled: P per image, P = the
    # most present in an image (a count read on the host, where it costs nothing; on a GPU all 1+C, as the read
    # would sync, and the absent ones masked). Every channel is refined and resized independently and absent
    # classes get probability 0 (-inf before the softmax), so the labels are those of all channels
    K = C + 1
    keep = torch.cat([torch.ones_like(cls_label[:, :1], dtype=torch.bool), cls_label > 0.5], dim=1)  # (B, K)
    p = keep.sum(dim=1)  # present channels per image, background included
    P = int(p.max()) if _host_reads_are_free(cams.device) else K
    sel, valid = _present_first(keep, P)  # (B, P) class ids, present first (class order); (B, P) present
    cam_idx = (sel[:, 1:] - 1).view(B, P - 1, 1, 1)  # the CAM channel of each class after the background
    if 4 * (P - 1) < C:  # few classes: take them at full size, then resize
        part = cams.gather(1, cam_idx.expand(-1, -1, H, W)).float()
        part = F.interpolate(part, size=(h, w), mode="bilinear", align_corners=False)
    else:
        part = F.interpolate(cams.float(), size=(h, w), mode="bilinear", align_corners=False)
        part = part.gather(1, cam_idx.expand(-1, -1, h, w))
    absent = ~valid.view(B, P, 1, 1)
    stacks = [torch.cat([part.new_full((B, 1, h, w), bkg), part], dim=1).masked_fill(absent, float("-inf"))
              .softmax(dim=1) for bkg in (bkg_high, bkg_low)]  # (B, P, h, w) each, 0 on absent classes
    # one refine call for the batch and both thresholds, each image's present channels first
    # ([high: p][low: p][the rest]), their count passed on the device, the rest skipped by the kernels
    order = _stack_order(p, P)  # (B, 2P): position in cat(stacks) of each channel of the refine's input
    stack = torch.cat(stacks, dim=1).gather(1, order.view(B, 2 * P, 1, 1).expand(-1, -1, h, w))
    refined = refine(img_s, stack, dilations=dilations, num_iter=num_iter, mode=mode, num_channels=2 * p,
                     backend=backend)
    # the argmax of each stack over its present channels, resized: an image with fewer than P repeats its last
    # present channel, which ties with it and so never wins (argmax returns the first maximum); present channels
    # keep class order, so ties between classes resolve as over all channels (absent ones can never win)
    pos = torch.minimum(torch.arange(P, device=cams.device).view(1, P), (p - 1).view(B, 1))  # (B, P)
    idx = torch.cat([pos, pos + p.view(B, 1)], dim=1)  # (B, 2P): the high stack's present channels, the low's
    sub = refined.gather(1, idx.view(B, 2 * P, 1, 1).expand(-1, -1, h, w))
    # resized channels-last: the argmax over channels then reads contiguous memory
    sub = F.interpolate(sub.contiguous(memory_format=torch.channels_last), size=(H, W), mode="bilinear",
                        align_corners=False)
    cls_of = torch.cat([sel, sel], dim=1).gather(1, order).gather(1, idx)  # (B, 2P) class id of each channel
    high = cls_of[:, :P].gather(1, sub[:, :P].argmax(1).view(B, -1)).view(B, H, W)
    low = cls_of[:, P:].gather(1, sub[:, P:].argmax(1).view(B, -1)).view(B, H, W)
    label = torch.where(high == 0, torch.where(low == 0, 0, IGNORE_INDEX), high)
    if img_box is not None:
        label = label.masked_fill(~box_mask(img_box, H, W), IGNORE_INDEX)
    return label


def _host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor's value on the host costs nothing (CPU tensors) or would block on a device."""
    return device.type == "cpu"


def _present_first(keep: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first P classes of each image, present ones first.

    Args:
        keep: (B, K) bool, the present channels (background included, always present) of one threshold's stack.
        P: how many to take (at least the most present in an image).

    Returns:
        ``(sel, valid)``: sel (B, P) int64 class ids, the present ones first in class order, then absent ones;
        valid (B, P) bool, whether each is present.
    """
    B, K = keep.shape
    k = torch.arange(K, device=keep.device)
    sel = ((~keep).long() * K + k).argsort(dim=1)[:, :P]
    return sel, keep.gather(1, sel)


def _stack_order(p: torch.Tensor, P: int) -> torch.Tensor:
    """(B, 2P) int64: for each channel of the refine's input, its position in ``cat([high, low], 1)`` (P each):
    the p present high channels, the p present low ones, then channels the refine skips (any)."""
    n = torch.arange(2 * P, device=p.device).view(1, -1)
    p = p.view(-1, 1)
    return torch.where(n < p, n, torch.where(n < 2 * p, P + n - p, n))


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
