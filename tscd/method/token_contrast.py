"""ToCo's parts (Ru et al., "Token Contrast for Weakly-Supervised Semantic Segmentation", CVPR 2023): the patch
token contrast (PTC) and its token labels, the class token contrast (CTC) with its local crops, projection heads and
EMA teacher. ``recipe: toco`` (:mod:`tscd.method.recipes.toco`) puts them together.

PTC. The auxiliary CAM (from an intermediate block's tokens), resized to the token grid, gives a token label with
the two thresholds (confident foreground above ``high``, background at or below ``low``, ignored between). Every
pair of labelled tokens is positive when the labels agree, negative otherwise (a token with itself is ignored);
the loss pulls |cos| of the final tokens to 1 on positive pairs and to 0 on negative ones.

CTC. Local crops are centred on pixels drawn among those whose auxiliary-CAM score is not confident foreground
(the "uncertain region" of the paper: background included), a crop is a negative when its ROI values (0 below
``low``, 1 between, 2 at or above ``high``) sum to at most ``neg_ratio`` of its area. The class tokens of the two
global views go through the teacher head (an EMA of the student head, no gradient), those of the global views and
of the local crops through the student head; an InfoNCE-like loss (temperature ``temp``) pulls positive crops to
both global views and pushes negatives away.

Nothing here reads a tensor on the host: crop positions are drawn with random keys and ``topk`` (uniform among
the candidates, as the official random permutation), window sums come from a summed-area table.

Official-code quirks kept (docs/differences.md, "recipe: toco"): the token label's image box is applied in pixel
coordinates to the token grid; the flag rule sums ROI values (confident pixels count twice); the CTC loss of an
image always contains the term of a "virtual" positive whose logit is 1 (a Python ``for ... else``), besides one
term per positive crop, divided by the number of positives.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tscd.constants import IGNORE_INDEX
from tscd.method.labels import box_mask

# -- labels ----------------------------------------------------------------------------------------------------


def valid_max(cams: Tensor, cls_label: Tensor) -> tuple[Tensor, Tensor]:
    """Max over the image's present classes: ``(value, class index)`` of ``cls_label * cams`` per pixel."""
    return (cams * cls_label[:, :, None, None].to(cams.dtype)).max(dim=1)


def roi_mask(cams_aux: Tensor, cls_label: Tensor, low: float, high: float) -> Tensor:
    """The CTC's region map (B, H, W) int64: 0 where the best present-class score <= ``low``, 2 where >= ``high``,
    1 in between."""
    value, _ = valid_max(cams_aux, cls_label)
    roi = torch.ones_like(value, dtype=torch.int64)
    roi[value <= low] = 0
    roi[value >= high] = 2
    return roi


def token_label(cams_aux: Tensor, cls_label: Tensor, img_box: Tensor, grid: tuple[int, int], low: float,
                high: float) -> Tensor:
    """The PTC's token label (B, h, w) int64: class + 1 above ``high``, 0 at or below ``low``, 255 between and
    outside the image box. The CAMs are resized to ``grid`` (bilinear, ``align_corners=False``); the box is
    applied in PIXEL coordinates to the token grid (the official code's quirk)."""
    small = F.interpolate(cams_aux, size=grid, mode="bilinear", align_corners=False)
    value, idx = valid_max(small, cls_label)
    label = idx + 1
    label[value <= high] = IGNORE_INDEX
    label[value <= low] = 0
    return torch.where(box_mask(img_box, *grid), label, torch.full_like(label, IGNORE_INDEX))


def pair_label(label: Tensor) -> Tensor:
    """(B, h, w) token label -> (B, N, N) int8 pair label: 1 same label, 0 different, -1 ignored (a token whose
    label is 255, and every token with itself)."""
    flat = label.flatten(1)
    pairs = (flat[:, :, None] == flat[:, None, :]).to(torch.int8)
    ignored = flat == IGNORE_INDEX
    pairs.masked_fill_(ignored[:, :, None] | ignored[:, None, :], -1)
    pairs.diagonal(dim1=1, dim2=2).fill_(-1)
    return pairs


def pair_counts(pairs: Tensor) -> tuple[Tensor, Tensor]:
    """(positive, negative) pairs of a pair label: the normalisers of :func:`ptc_loss`."""
    return (pairs == 1).sum(), (pairs == 0).sum()


# -- local crops -----------------------------------------------------------------------------------------------


def crop_candidates(roi: Tensor, crop_size: int, num: int) -> Tensor:
    """(B, H - 2m, W - 2m) bool, m = crop_size // 2: the top-left corners a crop may take (the crop is then centred
    on the ROI pixel (y + m, x + m)): pixels not confidently foreground (ROI <= 1); every position of an image with
    fewer than ``num`` such pixels."""
    m = crop_size // 2
    H, W = roi.shape[-2:]
    if H - 2 * m <= 0 or W - 2 * m <= 0:
        raise ValueError(f"local crops: a {crop_size}-px crop does not fit a {H}x{W} image "
                         f"(toco.local_crop_size must be at most the crop size)")
    cand = roi[:, m:H - m, m:W - m] <= 1
    enough = cand.flatten(1).sum(1) >= num
    return cand | ~enough[:, None, None]


def draw_positions(candidates: Tensor, num: int, generator: torch.Generator | None = None) -> Tensor:
    """(B, num, 2) int64 (y, x) top-left corners, ``num`` distinct candidates per image drawn uniformly (the
    largest random keys among the candidates: the first ``num`` of a random permutation)."""
    B, h, w = candidates.shape
    keys = torch.rand(B, h * w, generator=generator, device=candidates.device)
    keys = keys.masked_fill(~candidates.flatten(1), -1.0)
    idx = keys.topk(num, dim=1).indices
    return torch.stack([idx // w, idx % w], dim=-1)


def gather_crops(images: Tensor, positions: Tensor, crop_size: int) -> Tensor:
    """Windows ``images[b, :, y:y + s, x:x + s]`` at (B, K, 2) top-left ``positions`` -> (K * B, 3, s, s), crop-major
    (crop k of image b at row k * B + b, as the official concatenation of the crop list)."""
    B, C = images.shape[:2]
    ar = torch.arange(crop_size, device=images.device)
    ys = (positions[..., 0, None] + ar).transpose(0, 1)  # (K, B, s)
    xs = (positions[..., 1, None] + ar).transpose(0, 1)
    b = torch.arange(B, device=images.device).view(1, B, 1, 1)
    crops = images[b, :, ys[..., :, None], xs[..., None, :]]  # (K, B, s, s, C)
    return crops.permute(0, 1, 4, 2, 3).flatten(0, 1)


def window_sums(values: Tensor, positions: Tensor, size: int) -> Tensor:
    """Sums of ``values`` (B, H, W) over the ``size`` x ``size`` windows at (B, K, 2) top-left ``positions`` (a
    summed-area table; exact for integers)."""
    B = values.shape[0]
    sat = F.pad(values.to(torch.int64).cumsum(1).cumsum(2), (1, 0, 1, 0))
    y, x = positions[..., 0], positions[..., 1]
    b = torch.arange(B, device=values.device)[:, None]
    return sat[b, y + size, x + size] - sat[b, y, x + size] - sat[b, y + size, x] + sat[b, y, x]


def crop_flags(roi: Tensor, positions: Tensor, crop_size: int, neg_ratio: float) -> Tensor:
    """(B, K) bool: a crop is positive unless its ROI values sum to at most ``neg_ratio`` of its area."""
    ratio = window_sums(roi, positions, crop_size).float() / (crop_size * crop_size)  # float32, as the official
    return ratio > neg_ratio


# -- heads and losses ------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """A DINO-style projection head: an MLP (``layers`` linear layers with GELU, the last to ``bottleneck``), L2
    normalisation, then a bias-free linear layer to ``out_dim`` whose rows are kept at unit norm (weight
    normalisation with the gain frozen at 1: only the direction ``weight_v`` is learned).

    Args:
        in_dim: token width. out_dim, hidden, bottleneck, layers: ToCo's 1024, 2048, 256, 3.
    """

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden: int = 2048, bottleneck: int = 256,
                 layers: int = 3) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.weight_v = nn.Parameter(nn.Linear(bottleneck, out_dim, bias=False).weight.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        v = self.weight_v
        return F.linear(x, v / v.norm(dim=1, keepdim=True))


class EMATeacher(nn.Module):
    """A frozen copy of a module, updated as ``t = m * t + (1 - m) * s`` parameter by parameter."""

    def __init__(self, student: nn.Module, momentum: float) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        m = self.momentum
        for t, s in zip(self.module.parameters(), student.parameters(), strict=True):
            t.copy_(m * t + (1.0 - m) * s.detach())

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


def ptc_loss(tokens: Tensor, pairs: Tensor, counts: tuple[Tensor, Tensor] | None = None,
             share: float = 1.0) -> Tensor:
    """Patch token contrast: ``0.5 (1 - S+ / (n+ + 1)) + 0.5 S- / (n- + 1)`` with S the sums of |cos| of the
    final tokens over positive / negative pairs of the whole batch.

    Args:
        tokens: (B, D, h, w) final token map, with grad.
        pairs: (B, N, N) :func:`pair_label`.
        counts: (n+, n-) of the whole batch (several micro-batches), or None: this one's.
        share: this micro-batch's share of the batch (the constant 0.5 is split across micro-batches, so that
            their sum is the batch's loss).
    """
    x = F.normalize(tokens.flatten(2).float(), p=2, dim=1, eps=1e-8)
    cos = torch.bmm(x.transpose(1, 2), x).abs()
    n_pos, n_neg = pair_counts(pairs) if counts is None else counts
    s_pos = cos.masked_fill(pairs != 1, 0).sum()
    s_neg = cos.masked_fill(pairs != 0, 0).sum()
    return 0.5 * (share - s_pos / (n_pos + 1)) + 0.5 * s_neg / (n_neg + 1)


def ctc_loss(student: Tensor, teacher: Tensor, flags: Tensor, temp: float) -> Tensor:
    """Class token contrast of ToCo, averaged over the images.

    For image b, with l_gj = exp(<teacher_g, student_j> / temp) for its two global views g and its crops j
    (the two global views first, always positive; ``flags`` marks the positive local crops): per global view g,
    ``sum over positives p of -log(l_gp / (l_gp + N_g + 1e-4)) - log(1 / (1 + N_g + 1e-4))`` with N_g the sum of
    l_gj over the negatives, summed over g and divided by 2 (number of positives + 1e-4).

    Args:
        student: (J * B, K) student outputs, view-major (the two global views, then the crops).
        teacher: (2 * B, K) teacher outputs of the two global views, view-major.
        flags: (B, J - 2) bool, True for a positive local crop.
        temp: temperature.
    """
    B = flags.shape[0]
    s = student.float().view(-1, B, student.shape[-1]).transpose(0, 1)  # (B, J, K)
    t = teacher.float().view(2, B, teacher.shape[-1]).transpose(0, 1)  # (B, 2, K)
    logits = torch.exp(torch.bmm(t, s.transpose(1, 2)) / temp)  # (B, 2, J)
    pos = torch.cat([flags.new_ones(B, 2), flags], dim=1)  # (B, J)
    neg_sum = logits.masked_fill(pos[:, None, :], 0).sum(-1, keepdim=True)  # (B, 2, 1)
    per_pos = -torch.log(logits / (logits + neg_sum + 1e-4))
    loss = per_pos.masked_fill(~pos[:, None, :], 0).sum(-1) - torch.log(1.0 / (1.0 + neg_sum.squeeze(-1) + 1e-4))
    n_pos = pos.sum(1).to(loss.dtype)
    return (loss.sum(1) / 2 / (n_pos + 1e-4)).mean()
