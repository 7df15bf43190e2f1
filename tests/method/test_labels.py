"""tscd.method.labels: the VARM image (uint8 truncation), no host sync in the pseudo-label path, and only the
present classes refined."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tscd.method.labels as labels_mod
from tscd.data.transforms import normalize
from tscd.kernels import refine
from tscd.method.labels import box_mask, cam_to_label, refine_cams_with_bkg, refine_cams_with_bkg_sequential, varm_image


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
    steps = shared.SharedSteps(Config(), SimpleNamespace(device=torch.device("cpu"), compiled=lambda fn, what: fn))
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
    """The path a GPU takes (CPU tensors read their counts on the host, where a read costs nothing)."""
    img01, cams, cls_label, img_box = _inputs()
    want = refine_cams_with_bkg_sequential(img01, cams, cls_label, img_box, backend="torch", num_iter=3)
    monkeypatch.setattr(labels_mod, "_host_reads_are_free", lambda device: False)
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


def _all_channels(image01, cams, cls_label, img_box, **kw):
    """The pseudo labels refining all 2 (1+C) channels (before absent channels were skipped)."""
    B, C, H, W = cams.shape
    scale = kw.pop("scale", 0.5)
    h, w = max(1, int(H * scale)), max(1, int(W * scale))
    img_s = F.interpolate(image01.float(), size=(h, w), mode="bilinear", align_corners=False)
    cams_s = F.interpolate(cams.float(), size=(h, w), mode="bilinear", align_corners=False)
    keep = torch.cat([torch.ones_like(cls_label[:, :1], dtype=torch.bool), cls_label > 0.5], dim=1)
    drop = ~keep.view(B, C + 1, 1, 1)
    stacks = [torch.cat([torch.full_like(cams_s[:, :1], bkg), cams_s], 1).masked_fill(drop, float("-inf")).softmax(1)
              for bkg in (0.55, 0.35)]
    refined = F.interpolate(refine(img_s, torch.cat(stacks, 1), **kw), size=(H, W), mode="bilinear",
                            align_corners=False)
    high = refined[:, :C + 1].masked_fill(drop, float("-inf")).argmax(1)
    low = refined[:, C + 1:].masked_fill(drop, float("-inf")).argmax(1)
    label = torch.where(high == 0, torch.where(low == 0, 0, 255), high)
    return label.masked_fill(~box_mask(img_box, H, W), 255)


@pytest.mark.parametrize("C,size", [(20, (37, 45)), (80, (24, 31))])
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("host_reads", [True, False], ids=["cpu-path", "gpu-path"])
@pytest.mark.parametrize("many", [True, False], ids=["many-classes", "few-classes"])
def test_pseudo_labels_refine_present_channels_only(monkeypatch, C, size, backend, host_reads, many):
    """Only each image's present channels are refined (num_channels = 2 (1 + present), on the device) and resized
    for the argmax, of 2P channels (P: the most present in an image on the CPU path, every class on the GPU path),
    and the labels are those of refining every channel, to the bit: VOC and COCO widths, odd sizes, an image
    without any class, one with many."""
    monkeypatch.setattr(labels_mod, "_host_reads_are_free", lambda device: host_reads)
    resized = []
    real_interpolate = labels_mod.F.interpolate
    monkeypatch.setattr(labels_mod.F, "interpolate", lambda x, **kw: resized.append(x.shape[1]) or
                        real_interpolate(x, **kw))
    H, W = size
    g = torch.Generator().manual_seed(C)
    B = 4
    img01, cams = torch.rand(B, 3, H, W, generator=g), torch.rand(B, C, H, W, generator=g) ** 2
    cls_label = torch.zeros(B, C)
    cls_label[0, [1, C - 1]] = 1
    cls_label[2, ::3 if many else C // 2] = 1  # many classes (resized, then taken), or few (taken, then resized)
    cls_label[3, [0]] = 1  # image 1 has no class at all (background only)
    img_box = torch.tensor([[0, H, 0, W], [2, H - 3, 3, W - 1], [0, H - 5, 1, W], [0, H, 0, W - 4]])
    want = _all_channels(img01, cams, cls_label, img_box, num_iter=4, backend=backend)
    seen = {}
    real = labels_mod.refine

    def spy(image, cam, **kw):
        seen["nc"], seen["K"] = kw["num_channels"], cam.shape[1]
        out = real(image, cam, **kw)
        nc = kw["num_channels"]
        skipped = torch.arange(cam.shape[1]).view(1, -1) >= nc.view(-1, 1)
        assert bool((out.permute(1, 0, 2, 3)[skipped.t()] == 0).all()), "skipped channels must come back as 0"
        return out

    monkeypatch.setattr(labels_mod, "refine", spy)
    got = refine_cams_with_bkg(img01, cams, cls_label, img_box, num_iter=4, backend=backend)
    P = 1 + int(cls_label.sum(1).max()) if host_reads else C + 1
    assert seen["K"] == 2 * P
    assert seen["nc"].tolist() == [2 * (1 + int(n)) for n in cls_label.sum(1)]
    assert torch.equal(got, want)
    assert resized[-1] == 2 * P


def test_refine_device_num_channels_is_clamped_without_a_check():
    """num_channels as a tensor on the maps' device is used as is (no host read), clamped to [0, K]; a sequence is
    checked."""
    g = torch.Generator().manual_seed(0)
    img, cam = torch.rand(2, 3, 9, 11, generator=g), torch.rand(2, 5, 9, 11, generator=g)
    got = refine(img, cam, num_iter=2, num_channels=torch.tensor([9, -2]), backend="cpp")
    want = refine(img, cam, num_iter=2, num_channels=[5, 0], backend="cpp")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="num_channels"):
        refine(img, cam, num_iter=2, num_channels=[9, 0], backend="cpp")
