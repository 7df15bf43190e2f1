"""Properties of the ToCo transcription (``_toco_official.py``) that hold without our recipe: the official code's
quirks are there (the CTC loss's for/else term, the PTC label boxed in pixels on the token grid, crops and flags by
the official windows and sum rule, the EMA before the teacher pass, the warm-up weights)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.train import _toco_official as toco


class _Encoder(torch.nn.Module):
    """A tiny encoder with the interface the transcription expects."""

    def __init__(self, dim=6, patch=8):
        super().__init__()
        self.patch_size = patch
        self.embed = torch.nn.Conv2d(3, dim, patch, patch)
        self.mix = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward_features(self, x):
        aux = self.embed(x).flatten(2).transpose(1, 2)
        tokens = self.norm(aux + torch.tanh(self.mix(aux)))
        return tokens.mean(dim=1) * 2, tokens, aux


class _Net(torch.nn.Module):
    def __init__(self, dim=6, classes=3):
        super().__init__()
        self.encoder = _Encoder(dim)
        self.classifier = torch.nn.Conv2d(dim, classes, 1, bias=False)
        self.aux_classifier = torch.nn.Conv2d(dim, classes, 1, bias=False)
        self.decoder = torch.nn.Conv2d(dim, classes + 1, 3, padding=1)


def _ctc_by_hand(out_s, out_t, flags, ncrops, temp):
    B = flags.shape[0]
    total = 0.0
    for i in range(B):
        e = [[math.exp(float(out_t[v * B + i] @ out_s[c * B + i]) / temp) for c in range(ncrops)] for v in range(2)]
        pos = [c for c in range(ncrops) if flags[i, c]]
        loss = 0.0
        for v in range(2):
            neg = sum(e[v][c] for c in range(ncrops) if not flags[i, c])
            loss += sum(-math.log(e[v][j] / (e[v][j] + neg + 1e-4)) for j in pos)
            loss += -math.log(1 / (1 + neg + 1e-4))  # the for/else branch
        total += loss / 2 / (len(pos) + 1e-4)
    return total / B


@pytest.mark.parametrize("negatives", [[], [2], [1, 3]], ids=["all_positive", "one_negative", "two_negatives"])
def test_ctc_loss_always_adds_the_else_term(negatives):
    torch.manual_seed(0)
    B, ncrops = 2, 4
    out_s, out_t = torch.randn(ncrops * B, 5, dtype=torch.float64), torch.randn(2 * B, 5, dtype=torch.float64)
    flags = torch.ones(B, ncrops, dtype=torch.float64)
    flags[0, negatives] = 0
    got = toco.ctc_loss(out_s, out_t, flags, ncrops, 0.5).item()
    assert got == pytest.approx(_ctc_by_hand(out_s, out_t, flags, ncrops, 0.5), rel=1e-12)
    if not negatives:  # all positive: the extra term is -log(1 / (1 + 1e-4)) per teacher view, still there
        assert got == pytest.approx(_ctc_by_hand(out_s, out_t, flags, ncrops, 0.5), rel=1e-12)
        e = torch.exp((out_t.view(2, B, 1, 5) * out_s.view(1, ncrops, B, 5).transpose(1, 2)).sum(-1) / 0.5)
        without = (-torch.log(e / (e + 1e-4))).sum(dim=(0, 2)) / 2 / (ncrops + 1e-4)
        extra = 2 * math.log(1 + 1e-4) / 2 / (ncrops + 1e-4)
        assert got == pytest.approx(without.mean().item() + extra, rel=1e-12)


def test_ptc_label_is_boxed_in_pixels_on_the_token_grid():
    cam = torch.full((2, 1, 4, 4), 0.9)
    cls_label = torch.ones(2, 1)
    box = torch.tensor([[2, 64, 1, 64], [4, 64, 0, 64]])  # pixel boxes of a 64x64 crop
    valid, label = toco.cam_to_label(cam, cls_label, box, 0.5, 0.7, 0.25)
    assert torch.equal(valid, cam)
    assert (label[0, :2] == 255).all() and (label[0, :, :1] == 255).all() and (label[0, 2:, 1:] == 1).all()
    assert (label[1] == 255).all()  # the top offset 4 is beyond the 4-row grid: the whole image is ignored
    cam[:, :, 3, 3] = 0.6  # between the thresholds: ignored; below the low one: background
    cam[:, :, 2, 3] = 0.2
    _, label = toco.cam_to_label(cam, cls_label, box, 0.5, 0.7, 0.25)
    assert label[0, 3, 3] == 255 and label[0, 2, 3] == 0


def test_aff_mask_ignores_the_diagonal_and_ignored_pixels():
    label = torch.tensor([[[0, 1], [1, 255]]])
    mask = toco.aff_mask(label)
    assert mask.shape == (1, 4, 4)
    assert (mask[0].diagonal() == 255).all() and (mask[0, 3] == 255).all() and (mask[0, :, 3] == 255).all()
    assert mask[0, 1, 2] == 1 and mask[0, 0, 1] == 0 and torch.equal(mask, mask.transpose(1, 2))


def test_local_crops_windows_and_sum_rule():
    B, s, n = 2, 4, 3
    images = torch.arange(B * 3 * 12 * 12, dtype=torch.float32).view(B, 3, 12, 12)
    roi = torch.zeros(B, 12, 12, dtype=torch.int16)
    roi[0, 0, 0:2] = 2  # two confident pixels in the window at (0, 0): 4 / 16 > 0.2 -> positive
    roi[0, 5, 5:8] = 1  # three uncertain pixels in the window at (5, 5): 3 / 16 <= 0.2 -> negative
    roi[0, 4, 4] = 2  # inside the margin-cropped mask (at (2, 2) there): not a candidate
    roi[1] = 2
    roi[1, 6, 6:8] = 1  # two candidates < 3: every position of the 8x8 margin-cropped mask is a candidate
    counts = toco.candidate_count(roi, s, n)
    assert counts == [63, 64]
    grid = [(y, x) for y in range(8) for x in range(8) if (y, x) != (2, 2)]
    perm0 = torch.tensor([grid.index((0, 0)), grid.index((5, 5)), grid.index((0, 4))]
                         + [k for k in range(63) if grid[k] not in ((0, 0), (5, 5), (0, 4))])
    perm1 = torch.arange(64).flip(0)
    crops, flags = toco.local_crops(images, roi, n, s, [perm0, perm1])
    assert len(crops) == n and crops[0].shape == (B, 3, s, s)
    for k, (y, x) in enumerate([(0, 0), (5, 5), (0, 4)]):  # top-left corners in full coordinates
        assert torch.equal(crops[k][0], images[0, :, y:y + s, x:x + s])
    for k, (y, x) in enumerate([(7, 7), (7, 6), (7, 5)]):
        assert torch.equal(crops[k][1], images[1, :, y:y + s, x:x + s])
    assert flags[0].tolist() == [1, 1, 1, 0, 0] and flags[1].tolist() == [1] * 5
    with pytest.raises(AssertionError):
        toco.local_crops(images, roi, n, s, [perm0[:10], perm1])


def test_forward_updates_the_teacher_before_its_pass():
    torch.manual_seed(0)
    net, head_s, head_t = _Net(), torch.nn.Linear(6, 4), torch.nn.Linear(6, 4).requires_grad_(False)
    t0 = [p.detach().clone() for p in head_t.parameters()]
    inputs = torch.randn(2, 3, 16, 16)
    crops = [inputs, torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    cls, seg, fmap, cls_aux, out_t, out_s = toco.toco_network_forward(net, head_s, head_t, inputs, crops, 0.9)
    for p0, pt, ps in zip(t0, head_t.parameters(), head_s.parameters()):
        assert torch.allclose(pt, 0.9 * p0 + 0.1 * ps)
    views = net.encoder.forward_features(torch.cat(crops[:2]))[0]
    assert torch.allclose(out_t, head_t(views)) and not out_t.requires_grad  # the encoder output detached
    locals_ = net.encoder.forward_features(torch.cat(crops[2:]))[0]
    assert torch.allclose(out_s, head_s(torch.cat([views, locals_])))
    assert cls.shape == cls_aux.shape == (2, 3) and seg.shape == (2, 4, 2, 2) and fmap.shape == (2, 6, 2, 2)
    assert torch.allclose(cls, fmap.amax(dim=(2, 3)) @ net.classifier.weight.view(3, 6).T)  # global max pool


def test_multi_scale_cams_always_run_the_1x_pass():
    torch.manual_seed(0)
    net, inputs = _Net(), torch.randn(2, 3, 32, 32)
    cam, cam_aux = toco.multi_scale_cams2(net, inputs, (0.5,))
    same = toco.multi_scale_cams2(net, inputs, (1.0, 0.5))
    assert torch.equal(cam, same[0]) and torch.equal(cam_aux, same[1])
    assert cam.shape == (2, 3, 32, 32) and cam.min() == 0 and cam.max() < 1 and not cam.requires_grad


def test_iteration_warm_up_weights():
    torch.manual_seed(0)
    net, head_s = _Net(), torch.nn.Linear(6, 4)
    inputs = torch.randn(2, 3, 32, 32)
    views = [inputs, torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    cls_label, box = torch.tensor([[1.0, 0, 1], [0, 1, 0]]), torch.tensor([[0, 32, 0, 32], [2, 30, 4, 32]])
    roi = toco.roi_mask(toco.multi_scale_cams2(net, inputs, (1.0, 0.5, 1.5))[1], cls_label, 0.25, 0.7)
    perms = [torch.randperm(n) for n in toco.candidate_count(roi, 16, 8)]
    teacher, out = torch.nn.Linear(6, 4).requires_grad_(False), {}
    for n_iter in (2000, 2001):  # 0-based: 2000 is the warm-up's last iteration
        head_t = copy.deepcopy(teacher)
        rec = {}
        t = toco.toco_iteration(net, head_s, head_t, inputs, cls_label, box, views, perms, n_iter,
                                crf=lambda img, p, r, lab: (p * r[:, None]).mean(), local_crop_size=16, record=rec)
        assert torch.equal(rec["roi"], roi) and rec["flags"].shape == (2, 10)
        assert set(t) == {"cls", "cls_aux", "ptc", "ctc", "seg", "reg", "total"}
        out[n_iter] = {k: v.item() for k, v in t.items()}
    base = {k: out[2000][k] for k in ("cls", "cls_aux", "ptc", "ctc", "seg", "reg")}
    assert out[2000]["total"] == pytest.approx(base["cls"] + base["cls_aux"] + 0.2 * base["ptc"] + 0.5 * base["ctc"])
    assert out[2001]["total"] == pytest.approx(base["cls"] + base["cls_aux"] + 0.2 * base["ptc"] + 0.5 * base["ctc"]
                                               + 0.1 * base["seg"] + 0.05 * base["reg"])
    assert all(math.isfinite(v) for v in base.values()) and out[2001]["seg"] == base["seg"]
