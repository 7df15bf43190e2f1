"""ToCo's official training objective, transcribed independently for the fidelity test of ``recipe: toco``.

What rulixiang/ToCo's ``scripts/dist_train_voc_seg_neg.py`` computes in one iteration (its ``model_seg_neg.network``,
``losses.py``, ``camutils.py``), written here from its behaviour (not its code) with plain PyTorch and without any
tscd label function, loss or kernel: the two-level multi-scale CAMs, the ROI mask of the auxiliary CAM, the local
crops drawn from it and their positive/negative flags, the network forward with the EMA teacher head, and the six
losses (cls, cls_aux, ptc, ctc, seg, reg). Only the PAR refinement is shared with the AFA transcription
(``_afa_official.refined_pseudo_label``): AFA's ``wetr/PAR.py`` and ``refine_cams_with_bkg_v2`` are the same code as
ToCo's ``model/PAR.py`` and ``refine_cams_with_bkg_v2`` (down-scale 2, background at the high / low threshold,
10 PAR iterations at dilations 1, 2, 4, 8, 12, 24).

The network interface (ours holds the weights): ``net.encoder.forward_features(x) -> (cls (B, D), tokens (B, N, D)
final-normed, aux (B, N, D))``, ``net.encoder.patch_size``, ``net.classifier`` / ``net.aux_classifier``
(``Conv2d(D, C, 1, bias=False)``), ``net.decoder`` ((B, D, h, w) -> (B, C + 1, h, w)); the projection heads are
the modules ``head_s`` (student, trained) and ``head_t`` (teacher: the official's parameters have
``requires_grad=False`` and change only by the EMA, which mutates ``head_t`` in place: deep-copy it per run).

Behaviour reproduced on purpose (the official code's quirks, see the functions' docstrings): the ROI candidates are
the mask values ``<= 1`` (uncertain *and* confident background) of the margin-cropped mask; a crop is negative when
the *sum* of its ROI values (0 / 1 / 2) over crop_size^2 is <= 0.2; the CTC loss always adds the
``-log(1 / (1 + sum neg + 1e-4))`` term (a ``for ... else`` without ``break``); the PTC label is boxed with the
*pixel* box on the token-resolution map; seg and reg are multiplied by 0.0 (not dropped) while
``n_iter <= 2000``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.train import _afa_official as afa

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
IGNORE = 255


def _channels(values, like):
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)


def denorm_float255(img):
    """``get_energy_loss``'s image: ``img * std + mean`` per channel, float, no rounding."""
    return img * _channels(STD, img) + _channels(MEAN, img)


def denorm_uint8_01(img):
    """``imutils.denormalize_img2`` (the PAR image): ``img * std + mean`` cast to uint8 (truncation), / 255."""
    return denorm_float255(img).to(torch.uint8).to(img.dtype) / 255.0


def box_slices(img_box, b):
    t, bo, le, r = (int(v) for v in img_box[b])
    return slice(t, bo), slice(le, r)


def _as_map(tokens, h, w):
    B, N, D = tokens.shape
    return tokens.transpose(1, 2).reshape(B, D, h, w)


def _token_maps(net, x):
    """One encoder pass: (cls token, final token map, aux token map) on the patch grid of ``x``."""
    cls_tok, tokens, aux = net.encoder.forward_features(x)
    p = net.encoder.patch_size
    h, w = x.shape[-2] // p, x.shape[-1] // p
    return cls_tok, _as_map(tokens, h, w), _as_map(aux, h, w)


def ema_update(head_s, head_t, momentum):
    """``param_t = m * param_t + (1 - m) * param_s`` for the zipped parameters (no schedule: m is constant)."""
    with torch.no_grad():
        for ps, pt in zip(head_s.parameters(), head_t.parameters()):
            pt.copy_(momentum * pt + (1.0 - momentum) * ps)


def toco_network_forward(net, head_s, head_t, inputs, crops, momentum):
    """The official ``network.forward(inputs, crops=...)``: (cls, seg, fmap, cls_aux, out_t, out_s).

    Order: the encoder on ``inputs``; then (``forward_proj``) the EMA update of ``head_t``, the teacher pass
    (encoder on the two global views concatenated, the class token *detached*, then ``head_t``), the student passes
    (encoder on the global views, then on all local crops concatenated; their class tokens concatenated, global
    first, then ``head_s``); then the token maps, the decoder on the final map, and the classifier logits from the
    global max pool of each map. ``crops`` = [global1, global2, local_1, ..., local_k]; out_t is (2B, K), rows
    view-major (view 0's batch, then view 1's); out_s is ((2 + k) B, K) in the same order.
    """
    _, fmap, fmap_aux = _token_maps(net, inputs)

    global_views = torch.cat(crops[:2], dim=0)
    local_views = torch.cat(crops[2:], dim=0)
    ema_update(head_s, head_t, momentum)
    out_t = head_t(net.encoder.forward_features(global_views)[0].detach())
    student_global = net.encoder.forward_features(global_views)[0]
    student_local = net.encoder.forward_features(local_views)[0]
    out_s = head_s(torch.cat([student_global, student_local], dim=0))

    seg = net.decoder(fmap)
    C = net.classifier.out_channels
    cls_aux = net.aux_classifier(F.adaptive_max_pool2d(fmap_aux, (1, 1))).view(-1, C)
    cls = net.classifier(F.adaptive_max_pool2d(fmap, (1, 1))).view(-1, C)
    return cls, seg, fmap, cls_aux, out_t, out_s


def _cam_pass(net, x):
    """The official ``cam_only`` forward: the decoder runs on the final map (its output discarded), the CAMs are
    the classifier weights applied to the token maps (no pooling), detached."""
    _, fmap, fmap_aux = _token_maps(net, x)
    net.decoder(fmap)
    cam = F.conv2d(fmap, net.classifier.weight).detach()
    cam_aux = F.conv2d(fmap_aux, net.aux_classifier.weight).detach()
    return cam, cam_aux


def multi_scale_cams2(net, inputs, scales):
    """``multi_scale_cam2`` -> (cam, cam_aux), (B, C, H, W) each, in [0, 1).

    Under no_grad, the network as it is (train mode in the official loop). The 1x pass first, always (even when
    1.0 is not in ``scales``), then every scale != 1.0 in order (resized to (int(s H), int(s W)), bilinear,
    corners not aligned); each pass on [x, x flipped]; each map resized to (H, W) bilinear, max with the un-flipped
    flip half, ReLU; summed over passes; minus the per-map min, divided by the per-map max + 1e-5.
    """
    B, _, H, W = inputs.shape
    order = [1.0] + [s for s in scales if s != 1.0]
    with torch.no_grad():
        sums = [0, 0]
        for s in order:
            x = inputs if s == 1.0 else F.interpolate(inputs, size=(int(s * H), int(s * W)), mode="bilinear",
                                                      align_corners=False)
            for k, m in enumerate(_cam_pass(net, torch.cat([x, x.flip(-1)], dim=0))):
                m = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
                sums[k] = sums[k] + F.relu(torch.max(m[:B], m[B:].flip(-1)))
        out = []
        for total in sums:
            total = total - total.amin(dim=(2, 3), keepdim=True)
            out.append(total / (total.amax(dim=(2, 3), keepdim=True) + 1e-5))
    return out[0], out[1]


def roi_mask(cam_aux, cls_label, low, high):
    """``cam_to_roi_mask2``: the max over the present classes' CAMs; int16 mask 0 where <= low, 2 where >= high,
    1 elsewhere (no box: the padding counts as whatever its CAM says)."""
    value = (cls_label[:, :, None, None] * cam_aux).amax(dim=1)
    roi = torch.ones_like(value, dtype=torch.int16)
    roi[value <= low] = 0
    roi[value >= high] = 2
    return roi


def _candidates(roi_i, crop_size, crop_num, size):
    """The official candidate positions of one image: (row, col) in the mask cropped by crop_size // 2 on each
    side where the mask is <= 1 (any value but 2), row-major; all positions of that crop when fewer than
    crop_num. A position (y, x) is the *top-left* corner of the window [y, y + crop_size) x [x, x + crop_size) in
    full coordinates, i.e. the window centred on the candidate pixel (y + m, x + m)."""
    H, W = size
    m = crop_size // 2
    inner = roi_i[m:H - m, m:W - m]
    pos = (inner <= 1).nonzero()
    if pos.shape[0] < crop_num:
        pos = (inner >= 0).nonzero()
    return pos


def candidate_count(roi, crop_size, crop_num, size=None):
    """Per image, the number of candidate positions, i.e. the length of the permutation the official draws with
    ``torch.randperm(n)`` (global CPU generator, images in batch order, one draw per image). ``size``: the local
    image's (H, W) when it differs from the mask's (the official crops the mask with the image's size)."""
    size = tuple(roi.shape[-2:]) if size is None else tuple(size)
    return [int(_candidates(roi[i], crop_size, crop_num, size).shape[0]) for i in range(roi.shape[0])]


def local_crops(images, roi, crop_num, crop_size, perms):
    """``crop_from_roi_neg(images, roi, crop_num, crop_size)`` -> (crops, flags).

    ``perms[i]``: a permutation of range(candidate_count(...)[i]) (the caller feeds the official's randperm draws);
    the first crop_num permuted candidates give, in order, crop k of image i = ``images[i, :, y:y + s, x:x + s]``
    and its flag: 0 (negative) when ``roi[i, y:y + s, x:x + s].sum() / s**2 <= 0.2`` (the values 0 / 1 / 2 are
    summed, so confident foreground pixels count twice), else 1. ``flags`` (B, crop_num + 2): columns 0, 1 (the
    global views) are always 1. ``crops``: crop_num tensors (B, 3, s, s), in the default float dtype (the official
    fills a ``torch.zeros`` buffer).
    """
    B, C, H, W = images.shape
    buf = torch.zeros((B, crop_num, C, crop_size, crop_size), dtype=torch.get_default_dtype(), device=images.device)
    flags = torch.ones((B, crop_num + 2), dtype=torch.get_default_dtype(), device=images.device)
    for i in range(B):
        pos = _candidates(roi[i], crop_size, crop_num, (H, W))
        perm = torch.as_tensor(perms[i])
        assert perm.numel() == pos.shape[0], (i, perm.numel(), pos.shape[0])
        chosen = pos[perm[:crop_num]]
        for k in range(crop_num):
            y, x = int(chosen[k, 0]), int(chosen[k, 1])
            buf[i, k] = images[i, :, y:y + crop_size, x:x + crop_size]
            if roi[i, y:y + crop_size, x:x + crop_size].sum() / (crop_size * crop_size) <= 0.2:
                flags[i, k + 2] = 0
    return [buf[:, k] for k in range(crop_num)], flags


def ctc_loss(out_s, out_t, flags, ncrops, temp):
    """``CTCLoss_neg``: per image, e = exp(teacher . student / temp) for the 2 teacher views x ncrops student
    views; neg = per teacher view the sum of e over the negative (flag 0) views; for every positive view j (the
    two global views included) -log(e_j / (e_j + neg + 1e-4)), plus, always, -log(1 / (1 + neg + 1e-4)) (the
    official's ``for ... else``: the loop has no break, so the else branch runs after it, once); summed over both
    teacher views, / 2 / (number of positives + 1e-4); mean over the batch. No normalisation of the head outputs
    here (the heads normalise before their weight-normed last layer), no centring."""
    B = flags.shape[0]
    student = out_s.reshape(ncrops, B, -1).permute(1, 0, 2)
    teacher = out_t.reshape(2, B, -1).permute(1, 0, 2)
    e = torch.exp(torch.matmul(teacher, student.permute(0, 2, 1)) / temp)  # (B, 2, ncrops)
    total = 0
    for i in range(B):
        neg = e[i][:, flags[i] == 0].sum(dim=1)
        positives = torch.nonzero(flags[i])[:, 0]
        loss = 0
        for j in positives:
            loss = loss - torch.log(e[i, :, j] / (e[i, :, j] + neg + 1e-4))
        loss = loss - torch.log(1 / (1 + neg + 1e-4))
        total = total + loss.sum() / 2 / (positives.shape[0] + 1e-4)
    return total / B


def aff_mask(label):
    """``label_to_aff_mask``: (B, hw, hw) 1 for equal labels, 0 for different, 255 on every pair with an ignored
    (255) pixel and on the diagonal."""
    B = label.shape[0]
    flat = label.reshape(B, -1)
    n = flat.shape[1]
    mask = (flat[:, :, None] == flat[:, None, :]).long()
    ignored = flat == IGNORE
    mask[ignored[:, None, :].expand(B, n, n)] = IGNORE
    mask[ignored[:, :, None].expand(B, n, n)] = IGNORE
    idx = torch.arange(n)
    mask[:, idx, idx] = IGNORE
    return mask


def ptc_loss(fmap, mask):
    """``get_masked_ptc_loss``: |cosine| between all token pairs of an image (L2-normalised over channels, eps
    1e-8); 0.5 (1 - mean over pairs labelled 1) + 0.5 mean over pairs labelled 0, both means over the whole batch
    with + 1 in the denominator."""
    B, D = fmap.shape[:2]
    x = F.normalize(fmap.reshape(B, D, -1), p=2, dim=1, eps=1e-8)
    cos = torch.matmul(x.transpose(1, 2), x).abs()
    pos, neg = mask == 1, mask == 0
    return 0.5 * (1 - (pos * cos).sum() / (pos.sum() + 1)) + 0.5 * (neg * cos).sum() / (neg.sum() + 1)


def cam_to_label(cam, cls_label, img_box, bkg_thre, high_thre, low_thre, ignore_mid=True):
    """``cam_to_label`` with a box: (valid_cam = CAMs times the class labels, label).

    label = 1 + argmax of valid_cam (``max(dim=1)``'s index), 0 where the max <= bkg_thre; then with ignore_mid
    255 where <= high_thre and 0 where <= low_thre (in this order: with bkg_thre <= high_thre the bkg threshold has
    no effect); 255 outside ``img_box[b][0]:[1], [2]:[3]`` -- slices taken in the *map's* own coordinates, also
    when the map is the token grid and the box is in pixels (the official does so for the PTC label: a box row
    beyond the grid leaves the label empty from there, a top offset >= h ignores the whole image)."""
    valid = cls_label[:, :, None, None] * cam
    value, idx = valid.max(dim=1)
    label = idx + 1
    label[value <= bkg_thre] = 0
    if ignore_mid:
        label[value <= high_thre] = IGNORE
        label[value <= low_thre] = 0
    out = torch.full_like(label, IGNORE)
    for b in range(cam.shape[0]):
        rows, cols = box_slices(img_box, b)
        out[b, rows, cols] = label[b, rows, cols]
    return valid, out


def seg_loss(logits, label):
    """``get_seg_loss``: 0.5 (CE over background-labelled pixels + CE over foreground-labelled pixels)."""
    return afa.seg_loss(logits, label.long())


def refined_label(inputs, valid_cam, cls_label, img_box, high_thre, low_thre):
    """``refine_cams_with_bkg_v2(PAR(10 iterations), denormalize_img2(inputs), valid_cam, ...)``: (B, H, W) long
    (the official's is float; its values are the same)."""
    return afa.refined_pseudo_label(denorm_uint8_01(inputs), valid_cam, cls_label, img_box, high_thre, low_thre,
                                    num_iter=10)


def box_roi(img_box, like):
    """``get_energy_loss``'s crop mask: zeros like ``like`` (B, H, W), 1 inside each image's box."""
    roi = torch.zeros_like(like)
    for b in range(like.shape[0]):
        rows, cols = box_slices(img_box, b)
        roi[b, rows, cols] = 1
    return roi


def toco_iteration(net, head_s, head_t, inputs, cls_label, img_box, crops_views, perms, n_iter, *, crf,
                   scales=(1.0, 0.5, 1.5), bkg_thre=0.5, high_thre=0.7, low_thre=0.25, local_crop_size=96, ncrops=10,
                   temp=0.5, momentum=0.9, w_ptc=0.2, w_ctc=0.5, w_seg=0.1, w_reg=0.05, warmup_iters=2000,
                   record=None):
    """One official iteration (``n_iter`` 0-based, the loop's index): the loss terms and ``total``; the caller
    back-propagates ``total``. Mutates ``head_t`` (the EMA).

    ``crops_views`` = the data loader's [global1 (= ``inputs``), global2, local image]; ``perms``: see
    :func:`local_crops` (draw them with :func:`candidate_count` on ``record["roi"]`` of a dry run, or recompute the
    ROI with :func:`multi_scale_cams2` and :func:`roi_mask`). ``crf(img255, probs, roi, label)``: the official's
    ``DenseEnergyLoss(weight=1e-7, sigma_rgb=15, sigma_xy=100, scale_factor=0.5)`` as ``get_energy_loss`` calls
    it: img255 = ``inputs * std + mean`` (float, not rounded), probs = softmax of the seg logits upsampled to
    (H, W) (bilinear, corners not aligned; the gradient flows here), roi = (B, H, W) 1 inside ``img_box`` else 0
    (``probs``' dtype), label = the refined pseudo label (B, H, W) long with 255 = ignore (the official passes it
    as uint8 (B, 1, H, W): same values). The official always computes it, also during the warm-up (weight 0.0);
    ``crf=None`` here gives reg = 0 (for tests of the other terms only). ``record``: a dict filled with the
    intermediates (cams, cams_aux, roi, flags, local_crops, valid_cam, pseudo_label, ptc_label, aff_mask).
    """
    B, _, H, W = inputs.shape
    rec = {} if record is None else record

    cams, cams_aux = multi_scale_cams2(net, inputs, scales)
    roi = roi_mask(cams_aux.detach(), cls_label, low_thre, high_thre)
    crops, flags = local_crops(crops_views[2], roi, ncrops - 2, local_crop_size, perms)
    cls, segs, fmap, cls_aux, out_t, out_s = toco_network_forward(
        net, head_s, head_t, inputs, [crops_views[0], crops_views[1], *crops], momentum)

    terms = {"cls": F.multilabel_soft_margin_loss(cls, cls_label),
             "cls_aux": F.multilabel_soft_margin_loss(cls_aux, cls_label),
             "ctc": ctc_loss(out_s, out_t, flags, ncrops, temp)}

    valid_cam, _ = cam_to_label(cams.detach(), cls_label, img_box, bkg_thre, high_thre, low_thre, ignore_mid=True)
    pseudo = refined_label(inputs, valid_cam, cls_label, img_box, high_thre, low_thre)
    segs = F.interpolate(segs, size=pseudo.shape[1:], mode="bilinear", align_corners=False)
    terms["seg"] = seg_loss(segs, pseudo)
    if crf is None:
        terms["reg"] = segs.new_zeros(())
    else:
        probs = F.softmax(segs, dim=1)
        terms["reg"] = crf(denorm_float255(inputs), probs, box_roi(img_box, probs[:, 0]), pseudo)

    small = F.interpolate(cams_aux, size=fmap.shape[2:], mode="bilinear", align_corners=False)
    _, ptc_label = cam_to_label(small.detach(), cls_label, img_box, bkg_thre, high_thre, low_thre, ignore_mid=True)
    mask = aff_mask(ptc_label)
    terms["ptc"] = ptc_loss(fmap, mask)

    seg_w, reg_w = (0.0, 0.0) if n_iter <= warmup_iters else (w_seg, w_reg)
    terms["total"] = (1.0 * terms["cls"] + 1.0 * terms["cls_aux"] + w_ptc * terms["ptc"] + w_ctc * terms["ctc"]
                      + seg_w * terms["seg"] + reg_w * terms["reg"])
    rec.update(cams=cams, cams_aux=cams_aux, roi=roi, flags=flags, local_crops=crops, valid_cam=valid_cam,
               pseudo_label=pseudo, ptc_label=ptc_label, aff_mask=mask)
    return terms
