"""AFA's official training objective, transcribed independently for the fidelity test of ``recipe: afa``.

What rulixiang/afa's ``scripts/dist_train_voc.py`` / ``dist_train_coco.py`` compute in one iteration, written
here from its behaviour (not its code) with plain PyTorch, as directly as possible and without any tscd label
function or kernel: the PAR refinement (neighbour shifts by padding, not our kernels), the two-threshold refined
label, the affinity label and radius mask, the random walk with the predicted affinity, the per-box refinement of
the propagated CAMs, and the losses. The network is ours holding the weights (AFA's ``WeTr`` with ``pooling=gmp``
is our ``TSCDNet`` with ``symmetric_affinity=True``: its ``cam_only`` output is our ``cam``, its ``attn_pred``
our ``affinity``), so only the objective is under test here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
DILATIONS = (1, 2, 4, 8, 12, 24)
#: the 8 neighbours of a 3x3 window without its centre, row by row
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def denorm_uint8_01(img):
    """AFA feeds PAR ``uint8(img * std + mean) / 255``."""
    return (img * STD.to(img) + MEAN.to(img)).to(torch.uint8).float() / 255.0


def neighbours(x):
    """(B, C, H, W) -> (B, C, 48, H, W): for each dilation and offset, x read at p + d * offset, edges repeated."""
    B, C, H, W = x.shape
    out = []
    for d in DILATIONS:
        padded = F.pad(x, (d, d, d, d), mode="replicate")
        for dy, dx in OFFSETS:
            out.append(padded[:, :, d + dy * d:d + dy * d + H, d + dx * d:d + dx * d + W])
    return torch.stack(out, dim=2)


def par(img01, maps, num_iter):
    """AFA's PAR: maps resized to the image (corners aligned), then num_iter steps of a weighted mean over the
    48 neighbours; weights softmax(-(|dI| / std / 0.3)^2 averaged over RGB) + 0.01 softmax of the position prior."""
    maps = F.interpolate(maps, size=img01.shape[-2:], mode="bilinear", align_corners=True)
    nb = neighbours(img01)
    std = nb.std(dim=2, keepdim=True)
    appearance = -((nb - img01.unsqueeze(2)).abs() / (std + 1e-8) / 0.3) ** 2
    appearance = appearance.mean(dim=1, keepdim=True)
    dist = torch.tensor([d * (math.sqrt(2) if dy and dx else 1.0) for d in DILATIONS for dy, dx in OFFSETS],
                        dtype=img01.dtype, device=img01.device)
    position = -(dist / (dist.std() + 1e-8) / 0.3) ** 2
    weights = appearance.softmax(dim=2) + 0.01 * position.softmax(dim=0).view(1, 1, -1, 1, 1)
    for _ in range(num_iter):
        maps = (neighbours(maps) * weights).sum(dim=2)
    return maps


def two_threshold(high, low):
    """255 where only the high run says background, 0 where both do, else the high run's class."""
    label = high.clone()
    label[high == 0] = 255
    label[(high == 0) & (low == 0)] = 0
    return label


def refined_pseudo_label(img01, cams, cls_label, img_box, high_thre, low_thre, num_iter):
    """AFA's ``refine_cams_with_bkg_v2``: per image, [bkg, present classes] at half size, softmax, PAR, back,
    argmax, inside the box; two thresholds."""
    B, C, H, W = cams.shape
    small = F.interpolate(img01, size=(H // 2, W // 2), mode="bilinear", align_corners=False)
    out = []
    for thre in (high_thre, low_thre):
        stack = torch.cat([torch.full_like(cams[:, :1], thre), cams], dim=1)
        stack = F.interpolate(stack, size=(H // 2, W // 2), mode="bilinear", align_corners=False)
        label = torch.full((B, H, W), 255, dtype=torch.long)
        for b in range(B):
            keys = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(cls_label[b])[:, 0] + 1])
            ref = par(small[b:b + 1], stack[b:b + 1, keys].softmax(dim=1), num_iter)
            ref = F.interpolate(ref, size=(H, W), mode="bilinear", align_corners=False)
            t, bo, le, r = (int(v) for v in img_box[b])
            label[b, t:bo, le:r] = keys[ref.argmax(dim=1)[0]][t:bo, le:r]
        out.append(label)
    return two_threshold(*out)


def radius_mask(h, w, radius):
    """(hw, hw): 1 for pairs at Chebyshev distance <= radius (self included)."""
    mask = torch.zeros(h * w, h * w)
    for i in range(h * w):
        for j in range(h * w):
            if abs(i // w - j // w) <= radius and abs(i % w - j % w) <= radius:
                mask[i, j] = 1
    return mask


def affinity_label(label, radius):
    """Label nearest-resized to 1/16 (floor), pairs: 1 same, 0 different, 255 if either is 255 or out of radius."""
    B, H, W = label.shape
    small = F.interpolate(label[:, None].float(), size=(H // 16, W // 16), mode="nearest").view(B, -1)
    pairs = (small[:, :, None] == small[:, None, :]).long()
    pairs[:, radius_mask(H // 16, W // 16, radius) == 0] = 255
    ignored = small == 255
    pairs[ignored[:, :, None].expand_as(pairs)] = 255
    pairs[ignored[:, None, :].expand_as(pairs)] = 255
    return pairs


def propagate(cams_small, aff, cls_label, bkg, radius):
    """AFA's ``propagte_aff_cam_with_bkg``: [bkg, cams] softmaxed over the present keys, times the affinity
    masked to the radius, squared, each column divided by its sum + 0.1; 0 on absent classes."""
    B, C, h, w = cams_small.shape
    scores = torch.cat([torch.full_like(cams_small[:, :1], bkg), cams_small], dim=1).view(B, C + 1, -1)
    a = aff.clone()
    a[:, radius_mask(h, w, radius) == 0] = 0
    a = a ** 2
    a = a / (a.sum(dim=1, keepdim=True) + 0.1)
    out = torch.zeros_like(scores)
    for b in range(B):
        keys = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(cls_label[b])[:, 0] + 1])
        out[b, keys] = scores[b, keys].softmax(dim=0) @ a[b]
    return out.view(B, C + 1, h, w)


def refine_in_boxes(img01, scores, cls_label, img_box, num_iter):
    """AFA's ``refine_cams_with_cls_label``: per image, the box of the image at half size refines the box of the
    present channels; 0 elsewhere."""
    out = torch.zeros_like(scores)
    for b in range(scores.shape[0]):
        t, bo, le, r = (int(v) for v in img_box[b])
        crop = img01[b:b + 1, :, t:bo, le:r]
        small = F.interpolate(crop, size=(crop.shape[-2] // 2, crop.shape[-1] // 2), mode="bilinear",
                              align_corners=False)
        keys = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(cls_label[b])[:, 0] + 1])
        ref = par(small, scores[b:b + 1, keys, t:bo, le:r], num_iter)
        out[b, keys, t:bo, le:r] = F.interpolate(ref, size=crop.shape[-2:], mode="bilinear", align_corners=False)[0]
    return out


def propagated_label(img01, cams, aff, grid, cls_label, img_box, high_thre, low_thre, radius, num_iter):
    """The label after AFA's switch iteration (its ``refined_aff_label``)."""
    B, C, H, W = cams.shape
    small = F.interpolate(cls_label[:, :, None, None] * cams, size=grid, mode="bilinear", align_corners=False)
    labels = []
    for thre in (high_thre, low_thre):
        scores = F.interpolate(propagate(small, aff.clone(), cls_label, thre, radius), size=(H, W), mode="bilinear",
                               align_corners=False)
        labels.append(refine_in_boxes(img01, scores, cls_label, img_box, num_iter).argmax(dim=1))
    label = two_threshold(*labels)
    inside = torch.zeros_like(label, dtype=torch.bool)
    for b in range(B):
        t, bo, le, r = (int(v) for v in img_box[b])
        inside[b, t:bo, le:r] = True
    return label.masked_fill(~inside, 255)


def multi_scale_cams(net, img, scales):
    """AFA's ``multi_scale_cam_with_aff_mat``: the 1x pass first, then the other scales; per pass the full
    network on image + flip; max with the un-flipped flip, ReLU, sum, min-max per map; the affinity of the
    largest scale's pass (un-flipped half)."""
    B, _, H, W = img.shape
    order = [1.0] + [s for s in scales if s != 1.0]
    total, affs = 0, []
    with torch.no_grad():
        for s in order:
            x = img if s == 1.0 else F.interpolate(img, size=(int(s * H), int(s * W)), mode="bilinear",
                                                   align_corners=False)
            out = net(torch.cat([x, x.flip(-1)], dim=0))
            affs.append(out.affinity)
            cam = F.interpolate(out.cam, size=(H, W), mode="bilinear", align_corners=False)
            total = total + F.relu(torch.max(cam[:B], cam[B:].flip(-1)))
        total = total - total.amin(dim=(2, 3), keepdim=True)
        total = total / (total.amax(dim=(2, 3), keepdim=True) + 1e-5)
    top = order.index(max(scales))
    return total, affs[top][:B]


def seg_loss(logits, label):
    """Mean of the cross-entropies over background-labelled and over foreground-labelled pixels."""
    bg = label.clone()
    bg[label != 0] = 255
    fg = label.clone()
    fg[label == 0] = 255
    return 0.5 * (F.cross_entropy(logits, bg, ignore_index=255) + F.cross_entropy(logits, fg, ignore_index=255))


def aff_loss(pred, target):
    pos, neg = (target == 1).float(), (target == 0).float()
    return 0.5 * (pos * (1 - pred)).sum() / (pos.sum() + 1) + 0.5 * (neg * pred).sum() / (neg.sum() + 1)


def afa_iteration(net, img, cls_label, img_box, n_iter, *, scales=(1.0, 0.5, 1.5), high_thre=0.55, low_thre=0.35,
                  radius=8, num_iter=10, switch_iters=6000, switch_aff_label=False, reg=0.0, crf=None):
    """One post-warm-up iteration of AFA (0-based ``n_iter``): returns (loss terms, labels); the caller
    back-propagates ``total``. ``crf(img255, probs, roi, label)``: the energy loss layer, needed when ``reg`` > 0."""
    B, _, H, W = img.shape
    img01 = denorm_uint8_01(img)
    cls_logits, segs, _, attn_pred = (lambda o: (o.cls_logits, o.seg_logits, None, o.affinity))(net(img))
    cams, aff = multi_scale_cams(net, img, scales)
    pseudo = refined_pseudo_label(img01, cams, cls_label, img_box, high_thre, low_thre, num_iter)
    label = pseudo
    if n_iter > switch_iters:
        top = max(scales)
        grid = (math.ceil(int(top * H) / 16), math.ceil(int(top * W) / 16))
        label = propagated_label(img01, cams, aff, grid, cls_label, img_box, high_thre, low_thre, radius, num_iter)
    aff_target = affinity_label(label if switch_aff_label else pseudo, radius)
    segs = F.interpolate(segs, size=(H, W), mode="bilinear", align_corners=False)
    terms = {"cls": F.multilabel_soft_margin_loss(cls_logits, cls_label), "seg": seg_loss(segs, label),
             "aff": aff_loss(attn_pred, aff_target)}
    total = terms["cls"] + 0.1 * terms["seg"] + 0.1 * terms["aff"]
    if reg:
        roi = torch.zeros(B, H, W)
        for b in range(B):
            t, bo, le, r = (int(v) for v in img_box[b])
            roi[b, t:bo, le:r] = 1
        terms["reg"] = crf(img * STD + MEAN, segs.softmax(dim=1), roi, label)
        total = total + reg * terms["reg"]
    terms["total"] = total
    return terms, {"pseudo": pseudo, "seg": label, "aff": aff_target}
