"""The vectorised random walk against a naive loop implementation of docs/method.md 6 / AFA's propagation."""
import pytest
import torch
import torch.nn.functional as F

from tests._utils import assert_close
from tscd.method.random_walk import affinity_cam_label, propagate_cam_with_bkg, radius_mask, transition_matrix


def naive_random_walk(cam_grid, aff, cls_label, bkg, radius, power, eps):
    """Loops over pixel pairs: cam_grid (B, C, h, w) already on the affinity grid."""
    b, c, h, w = cam_grid.shape
    n = h * w
    out = torch.zeros(b, c + 1, h, w, dtype=torch.float64)
    for bi in range(b):
        keys = [0] + [k + 1 for k in range(c) if cls_label[bi, k] > 0.5]
        scores = torch.cat([torch.full((1, h, w), bkg, dtype=torch.float64), cam_grid[bi].double()])
        probs = scores[keys].reshape(len(keys), n).softmax(0)
        t = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                yi, xi, yj, xj = i // w, i % w, j // w, j % w
                if max(abs(yi - yj), abs(xi - xj)) <= radius:
                    t[i, j] = float(aff[bi, i, j]) ** power
        t = t / (t.sum(0, keepdim=True) + eps)
        for kk, key in enumerate(keys):
            for j in range(n):
                out[bi, key, j // w, j % w] = sum(probs[kk, i] * t[i, j] for i in range(n))
    return out


@pytest.mark.parametrize("h,w,radius", [(3, 5, 1), (4, 3, 8), (2, 7, 2)])
def test_matches_naive_loop(h, w, radius):
    b, c = 2, 3
    cam = torch.rand(b, c, 16 * h, 16 * w)
    aff = torch.rand(b, h * w, h * w)
    cls_label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    got = propagate_cam_with_bkg(cam, aff, cls_label, bkg=0.35, radius=radius, power=2, eps=0.1)
    cam_grid = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)
    want = naive_random_walk(cam_grid, aff, cls_label, 0.35, radius, 2, 0.1)
    assert_close(got, want, rtol=1e-5, atol=1e-6, name="random walk")
    assert (got[0, 2] == 0).all() and (got[1, 1] == 0).all()  # absent classes stay 0


def test_radius_mask_is_chebyshev_and_cached():
    m = radius_mask(3, 4, 1)
    assert m.shape == (12, 12) and m.dtype == torch.bool
    assert bool(m[0, 5]) and not bool(m[0, 2]) and not bool(m[0, 8])  # (0,0)-(1,1) in; (0,2), (2,0) out
    assert torch.equal(m, m.T)
    assert radius_mask(3, 4, 1) is m


def test_transition_columns_normalised():
    aff = torch.ones(1, 4, 4)
    t = transition_matrix(aff, 2, 2, radius=8, power=2, eps=0.1)
    assert_close(t.sum(1), torch.full((1, 4), 4 / 4.1), rtol=1e-6, atol=1e-7, name="column sums")


def test_label_and_shape_errors():
    cam = torch.rand(1, 2, 40, 24)  # grid 3 x 2
    aff = torch.rand(1, 6, 6)
    lab = affinity_cam_label(cam, aff, torch.tensor([[0.0, 1.0]]), (37, 21))
    assert lab.shape == (1, 37, 21) and set(lab.unique().tolist()) <= {0, 2}
    with pytest.raises(ValueError, match="affinity has N = 6"):
        propagate_cam_with_bkg(torch.rand(1, 2, 64, 64), aff, torch.ones(1, 2))
    with pytest.raises(ValueError, match="cls_label"):
        propagate_cam_with_bkg(cam, aff, torch.ones(1, 3))
