"""tscd.method.labels: the VARM image (uint8 truncation), and no host sync in the pseudo-label path."""
from __future__ import annotations

import pytest
import torch

from tscd.data.transforms import normalize
from tscd.method.labels import cam_to_label, refine_cams_with_bkg, refine_cams_with_bkg_sequential, varm_image


def test_varm_image_truncates_to_uint8_as_the_official_code():
    raw = torch.tensor([[[100.7, 254.99, 0.4]], [[3.5, 17.2, 255.0]], [[128.999, 0.0, 64.5]]])  # (3, 1, 3)
    img = normalize(raw.permute(1, 2, 0).numpy())[None]  # (1, 3, 1, 3) normalised
    got = varm_image(img)
    want = (img[0] * torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
            + torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)).to(torch.uint8).float()[None] / 255
    assert torch.equal(got, want)  # the official (x * std + mean).to(uint8) / 255, bit for bit
    assert got[0, 0, 0, 0] * 255 == 100 and got[0, 0, 0, 1] * 255 == 254  # floor, not round
    untruncated = varm_image(img, truncate=False)
    assert abs(untruncated[0, 0, 0, 0].item() * 255 - 100.7) < 1e-3
    with pytest.raises(ValueError, match="img"):
        varm_image(torch.zeros(3, 4, 4))


def test_recipes_feed_the_refinement_the_truncated_image(monkeypatch):
    """TSCD's and AFA's pseudo labels (tscd.method.recipes.shared) refine with the official uint8 image."""
    from types import SimpleNamespace

    from tscd.config import Config
    from tscd.method.recipes import shared

    seen = []
    monkeypatch.setattr(shared, "refine_cams_with_bkg", lambda image01, *a, **k: seen.append(image01))
    steps = shared.SharedSteps(Config(), SimpleNamespace(device=torch.device("cpu")))
    img = torch.randn(2, 3, 5, 7)
    steps.pseudo_label(img, torch.rand(2, 4, 5, 7), torch.ones(2, 4), None)
    assert torch.equal(seen[0], varm_image(img))
    assert torch.equal(seen[0] * 255, (seen[0] * 255).round())  # integers on 0..255


class _SyncGuard:
    """Makes every host read of a tensor value raise (what would block a GPU step)."""

    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "numpy", "__index__")

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def __enter__(self):
        def boom(name):
            def fn(*args, **kwargs):
                raise AssertionError(f"host sync: Tensor.{name} called in the pseudo-label path")
            return fn

        for name in self.NAMES:
            self.mp.setattr(torch.Tensor, name, boom(name))
        self.mp.setattr(torch, "nonzero", boom("torch.nonzero"))
        return self

    def __exit__(self, *exc):
        self.mp.undo()


def _inputs(B=3, C=6, H=24, W=28):
    g = torch.Generator().manual_seed(0)
    img01 = torch.rand(B, 3, H, W, generator=g)
    cams = torch.rand(B, C, H, W, generator=g) ** 2
    cls_label = torch.zeros(B, C)
    cls_label[0, [1, 4]] = 1
    cls_label[1, [0]] = 1
    cls_label[2, [0, 2, 5]] = 1
    img_box = torch.tensor([[0, H, 0, W], [2, 20, 3, 27], [0, 15, 0, 17]])
    return img01, cams, cls_label, img_box


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_pseudo_labels_make_no_host_sync(monkeypatch, backend):
    img01, cams, cls_label, img_box = _inputs()
    want = refine_cams_with_bkg_sequential(img01, cams, cls_label, img_box, backend="torch", num_iter=3)
    with _SyncGuard(monkeypatch):
        got = refine_cams_with_bkg(img01, cams, cls_label, img_box, backend=backend, num_iter=3)
        lab = cam_to_label(cams, cls_label)
    assert (got != want).float().mean() < 1e-3
    assert lab.shape == (3, 24, 28)


def test_the_sync_guard_catches_a_sync(monkeypatch):
    """The guard works: the official per-image structure (nonzero per image) is caught."""
    img01, cams, cls_label, img_box = _inputs()
    with _SyncGuard(monkeypatch), pytest.raises(AssertionError, match="host sync"):
        refine_cams_with_bkg_sequential(img01, cams, cls_label, img_box, backend="torch", num_iter=1)
