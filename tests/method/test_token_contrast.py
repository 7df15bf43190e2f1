"""ToCo's parts (tscd/method/token_contrast.py) against plain loops: crop positions, windows, flags, token and pair
labels, the two contrast losses and the EMA teacher."""
from __future__ import annotations

import math

import pytest
import torch

from tscd.method.token_contrast import (
    EMATeacher,
    ProjectionHead,
    crop_candidates,
    crop_flags,
    ctc_loss,
    draw_positions,
    gather_crops,
    pair_counts,
    pair_label,
    ptc_loss,
    roi_mask,
    token_label,
    window_sums,
)


def test_roi_mask_thresholds():
    cams = torch.tensor([[[[0.1, 0.25, 0.3, 0.7, 0.9]]], [[[0.9, 0.9, 0.9, 0.9, 0.9]]]]).repeat(1, 2, 1, 1)
    cams[:, 1] = 0.0
    cls = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # image 1's only class has a zero CAM
    roi = roi_mask(cams, cls, low=0.25, high=0.7)
    assert roi[0, 0].tolist() == [0, 0, 1, 2, 2]
    assert roi[1].eq(0).all()


def test_candidates_and_fallback():
    roi = torch.full((2, 10, 12), 2, dtype=torch.int64)
    roi[0, 5, 6] = 1  # one uncertain pixel: fewer than 3 candidates -> every position
    roi[1, 2:8, 2:8] = 0
    cand = crop_candidates(roi, crop_size=4, num=3)
    assert cand.shape == (2, 6, 8)
    assert cand[0].all()
    assert torch.equal(cand[1], roi[1, 2:8, 2:10] <= 1)
    with pytest.raises(ValueError, match="local_crop_size"):
        crop_candidates(roi, crop_size=10, num=1)


def test_draw_positions_uniform_distinct_among_candidates():
    cand = torch.zeros(1, 4, 5, dtype=torch.bool)
    cand[0, 1, :] = True
    cand[0, 3, 2] = True
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 5)
    for _ in range(600):
        pos = draw_positions(cand, 3, g)
        assert pos.shape == (1, 3, 2)
        assert len({tuple(p) for p in pos[0].tolist()}) == 3  # distinct
        for y, x in pos[0].tolist():
            assert cand[0, y, x]
            counts[y, x] += 1
    picked = counts[cand[0]]
    assert picked.sum() == 1800
    assert (picked - 1800 / 6).abs().max() < 60  # each candidate ~ 1/2 of the draws (3 of 6), binomial sd ~ 12


def test_gather_crops_and_window_sums_match_slices():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 11, 13, generator=g)
    pos = torch.stack([torch.randint(0, 7, (3, 4), generator=g), torch.randint(0, 9, (3, 4), generator=g)], -1)
    crops = gather_crops(images, pos, 5)
    assert crops.shape == (12, 3, 5, 5)
    roi = torch.randint(0, 3, (3, 11, 13), generator=g)
    sums = window_sums(roi, pos, 5)
    for k in range(4):
        for b in range(3):
            y, x = pos[b, k].tolist()
            assert torch.equal(crops[k * 3 + b], images[b, :, y:y + 5, x:x + 5])  # crop-major
            assert sums[b, k] == roi[b, y:y + 5, x:x + 5].sum()


def test_crop_flags_sum_rule():
    roi = torch.zeros(1, 10, 10, dtype=torch.int64)
    roi[0, :2, :5] = 2  # 10 pixels of value 2: sum 20 of a 10x10 window = 0.2 -> negative (<=)
    pos = torch.tensor([[[0, 0]]])
    assert not crop_flags(roi, pos, 10, 0.2).item()
    roi[0, 9, 9] = 1
    assert crop_flags(roi, pos, 10, 0.2).item()


def test_token_label_box_in_pixels():
    cams = torch.zeros(1, 2, 8, 8)
    cams[0, 0, :, :4] = 0.9
    cams[0, 0, :, 4:] = 0.5
    cls = torch.tensor([[1.0, 1.0]])
    box = torch.tensor([[0, 8, 1, 8]])  # in pixels of the 8x8 image; applied as is to the 4x4 grid
    lab = token_label(cams, cls, box, (4, 4), low=0.25, high=0.7)
    assert lab[0, :, 0].eq(255).all()  # grid column 0 lies left of 'left = 1' on the grid (pixels 0-1 are in)
    assert lab[0, :, 1].eq(1).all()  # CAM 0.9 -> class 0 + 1
    assert lab[0, :, 2:].eq(255).all()  # 0.5: between the thresholds
    cams[0, 0] = 0.1
    assert token_label(cams, cls, box, (4, 4), 0.25, 0.7)[0, :, 1:].eq(0).all()


def test_pair_label_and_counts():
    lab = torch.tensor([[[0, 1], [1, 255]]])
    pairs = pair_label(lab)
    want = torch.tensor([[-1, 0, 0, -1], [0, -1, 1, -1], [0, 1, -1, -1], [-1, -1, -1, -1]], dtype=torch.int8)
    assert torch.equal(pairs[0], want)
    assert [int(c) for c in pair_counts(pairs)] == [2, 4]


def _ptc_loop(tokens, pairs):
    s_pos = s_neg = 0.0
    n_pos = n_neg = 0
    B, D, h, w = tokens.shape
    for b in range(B):
        x = tokens[b].reshape(D, -1)
        for i in range(h * w):
            for j in range(h * w):
                c = abs(float(x[:, i] @ x[:, j] / (x[:, i].norm() * x[:, j].norm())))
                if pairs[b, i, j] == 1:
                    s_pos, n_pos = s_pos + c, n_pos + 1
                elif pairs[b, i, j] == 0:
                    s_neg, n_neg = s_neg + c, n_neg + 1
    return 0.5 * (1 - s_pos / (n_pos + 1)) + 0.5 * s_neg / (n_neg + 1)


def test_ptc_loss_loop_and_micro_batches():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64)
    pairs = pair_label(torch.randint(0, 3, (2, 3, 3), generator=g).masked_fill(torch.rand(2, 3, 3, generator=g) < .3,
                                                                                 255))
    whole = ptc_loss(tokens, pairs)
    assert whole.item() == pytest.approx(_ptc_loop(tokens, pairs), rel=1e-6)
    c0, c1 = pair_counts(pairs[:1]), pair_counts(pairs[1:])
    counts = (c0[0] + c1[0], c0[1] + c1[1])
    parts = ptc_loss(tokens[:1], pairs[:1], counts, 0.5) + ptc_loss(tokens[1:], pairs[1:], counts, 0.5)
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def _ctc_loop(student, teacher, flags, temp):
    B = flags.shape[0]
    J = student.shape[0] // B
    total = 0.0
    for b in range(B):
        s = [student[j * B + b] for j in range(J)]
        pos = [True, True] + flags[b].tolist()
        per_image = 0.0
        for g in range(2):
            t = teacher[g * B + b]
            lg = [math.exp(float(t @ sj) / temp) for sj in s]
            neg = sum(v for v, p in zip(lg, pos) if not p)
            per_image += sum(-math.log(v / (v + neg + 1e-4)) for v, p in zip(lg, pos) if p)
            per_image += -math.log(1 / (1 + neg + 1e-4))
        total += per_image / 2 / (sum(pos) + 1e-4)
    return total / B


def test_ctc_loss_loop():
    g = torch.Generator().manual_seed(3)
    B, J, K = 3, 6, 5
    student = torch.nn.functional.normalize(torch.randn(J * B, K, generator=g, dtype=torch.float64), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(2 * B, K, generator=g, dtype=torch.float64), dim=1)
    flags = torch.tensor([[True, False, True, False], [True] * 4, [False] * 4])
    for temp in (0.5, 1.0):
        got = ctc_loss(student, teacher, flags, temp)
        assert got.item() == pytest.approx(_ctc_loop(student.float(), teacher.float(), flags, temp), rel=1e-5)


def test_projection_head_unit_rows_and_ema():
    torch.manual_seed(0)
    head = ProjectionHead(8, out_dim=7, hidden=16, bottleneck=4)
    x = torch.randn(5, 8)
    out = head(x)
    assert out.shape == (5, 7)
    assert out.abs().max() <= 1.0 + 1e-6  # unit-norm input to unit-norm rows
    teacher = EMATeacher(head, 0.9)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    teacher.update(head)
    for t, b, s in zip(teacher.parameters(), before, head.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s)
