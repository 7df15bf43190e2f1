"""The CRF loss's default gain is the field's (rloss / Kraehenbuehl permutohedral lattice, which TSCD trains with).

``field_lattice_filter`` is an independent, plain-Python transcription of that lattice (Adams et al. 2010 as
implemented in Kraehenbuehl's permutohedral.cpp): elevate with inv_std = sqrt(2/3) (d + 1), splat with barycentric
weights, blur every direction with v + (n1 + n2) / 2, slice and scale by alpha = 1 / (1 + 2^-d). It shares no code
with tscd's lattice.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tscd.kernels import dense_energy_loss
from tscd.kernels.permutohedral import field_gain
from tscd.kernels.reference.permutohedral import dense_energy_loss_with

#: The constant of the issue: ours / field = sqrt(6) (4 pi / 3)^2.5 * 33 / 2048.
RATIO = math.sqrt(6) * (4 * math.pi / 3) ** 2.5 * 33 / 2048


def _lattice_one(values: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """values (K, N), feats (d, N) -> (K, N): the field's unnormalised filter (self term included)."""
    d, n = feats.shape
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = np.array([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)])
    canonical = np.array([[i if j <= d - i else i - (d + 1) for j in range(d + 1)] for i in range(d + 1)])
    table: dict[tuple, int] = {}
    offsets = np.zeros((n, d + 1), dtype=np.int64)
    weights = np.zeros((n, d + 1))
    for p in range(n):
        cf = feats[:, p] * scale
        elevated = np.zeros(d + 1)
        acc = 0.0
        for j in range(d, 0, -1):
            elevated[j] = acc - j * cf[j - 1]
            acc += cf[j - 1]
        elevated[0] = acc
        rem0 = np.zeros(d + 1, dtype=np.int64)
        total = 0
        for i in range(d + 1):
            v = elevated[i] / (d + 1)
            up, down = math.ceil(v) * (d + 1), math.floor(v) * (d + 1)
            rem0[i] = up if up - elevated[i] < elevated[i] - down else down
            total += rem0[i]
        total //= d + 1
        rank = np.zeros(d + 1, dtype=np.int64)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if elevated[i] - rem0[i] < elevated[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            if total > 0:
                if rank[i] >= d + 1 - total:
                    rem0[i] -= d + 1
                    rank[i] += total - (d + 1)
                else:
                    rank[i] += total
            elif total < 0:
                if rank[i] < -total:
                    rem0[i] += d + 1
                    rank[i] += d + 1 + total
                else:
                    rank[i] += total
        bary = np.zeros(d + 2)
        for i in range(d + 1):
            v = (elevated[i] - rem0[i]) / (d + 1)
            bary[d - rank[i]] += v
            bary[d + 1 - rank[i]] -= v
        bary[0] += 1.0 + bary[d + 1]
        for r in range(d + 1):
            key = tuple(int(rem0[i] + canonical[r, rank[i]]) for i in range(d))
            offsets[p, r] = table.setdefault(key, len(table))
            weights[p, r] = bary[r]
    keys = list(table)
    m = len(keys)
    lattice = np.zeros((m + 1, values.shape[0]))  # row 0: "no neighbour" (always 0)
    for p in range(n):
        for r in range(d + 1):
            lattice[offsets[p, r] + 1] += weights[p, r] * values[:, p]
    for j in range(d + 1):
        nb = np.zeros((m, 2), dtype=np.int64)
        for idx, key in enumerate(keys):
            n1 = [k - 1 for k in key]
            n2 = [k + 1 for k in key]
            if j < d:
                n1[j] = key[j] + d
                n2[j] = key[j] - d
            nb[idx] = (table.get(tuple(n1), -1) + 1, table.get(tuple(n2), -1) + 1)
        new = lattice.copy()
        new[1:] = lattice[1:] + 0.5 * (lattice[nb[:, 0]] + lattice[nb[:, 1]])
        lattice = new
    alpha = 1.0 / (1.0 + 2.0 ** -d)
    out = np.zeros_like(values)
    for p in range(n):
        for r in range(d + 1):
            out[:, p] += weights[p, r] * lattice[offsets[p, r] + 1] * alpha
    return out


def field_lattice_filter(values, features, normalize, include_self):
    assert not normalize and include_self  # the CRF loss uses the plain filter
    out = [_lattice_one(v.detach().double().numpy(), f.detach().double().numpy()) for v, f in zip(values, features)]
    return torch.from_numpy(np.stack(out)).to(values.dtype)


def _inputs(h=22, w=26, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, h, w, generator=g) * 255
    img[:, :, : h // 2] = img[:, :, : h // 2] * 0.2 + 120  # two regions of different colour statistics
    probs = torch.randn(1, k, h, w, generator=g).mul(2).softmax(1)
    roi = torch.ones(1, h, w)
    roi[:, :, -4:] = 0
    label = torch.randint(0, k, (1, h, w), generator=g)
    label[:, :3] = 255
    return img, probs, roi, label


def test_field_gain_constant():
    assert abs(1.0 / field_gain(5) - 1.417363) < 1e-6
    assert abs(1.0 / field_gain(5) - RATIO) < 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_default_crf_loss_has_the_field_gain(seed):
    """Value and gradient of the default loss equal the field's (independent transcription) within 0.1 %."""
    img, probs, roi, label = _inputs(seed=seed)
    kw = dict(sigma_rgb=15.0, sigma_xy=100.0, scale=0.5)
    p_field = probs.clone().double().requires_grad_()
    field = dense_energy_loss_with(field_lattice_filter, img.double(), p_field, roi, label, weight=1e-7, **kw)
    (g_field,) = torch.autograd.grad(field, p_field)
    p_ours = probs.clone().double().requires_grad_()
    ours = dense_energy_loss(img.double(), p_ours, roi, label, backend="cpp", **kw)  # default gain
    (g_ours,) = torch.autograd.grad(ours, p_ours)
    assert abs(ours.item() / field.item() - 1) < 1e-3, (ours.item(), field.item())
    cos = torch.nn.functional.cosine_similarity(g_ours.flatten(), g_field.flatten(), dim=0)
    assert cos > 1 - 1e-6 and abs(g_ours.norm() / g_field.norm() - 1) < 1e-3
    exact_cal = dense_energy_loss(img.double(), probs.double(), roi, label, gain="exact", backend="cpp", **kw)
    assert abs(exact_cal.item() / field.item() - RATIO) < 2e-3 * RATIO  # the old default: 1.417x the field


def test_crf_gain_rejects_unknown():
    img, probs, roi, label = _inputs()
    with pytest.raises(ValueError, match="gain"):
        dense_energy_loss(img, probs, roi, label, gain="pydensecrf", backend="cpp")
