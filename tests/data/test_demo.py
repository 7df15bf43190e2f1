import numpy as np
import torch

from tscd.data import DemoDataset, VOCDataset, build_dataset, write_demo
from tscd.data.classes import DEMO_CLASSES
from tscd.data.demo import generate_demo_image


def test_demo_items_are_deterministic_and_well_formed():
    a = DemoDataset("train", num_images=12, size=64, seed=3, train=False)
    b = DemoDataset("train", num_images=12, size=64, seed=3, train=False)
    assert a.num_classes == 5 and a.class_names == list(DEMO_CLASSES) and len(a) == 12
    for i in range(12):
        ia, ib = a[i], b[i]
        assert ia["name"] == f"demo_train_{i:05d}"
        assert torch.equal(ia["img"], ib["img"]) and torch.equal(ia["label"], ib["label"])
        assert ia["img"].shape == (3, 64, 64) and ia["label"].shape == (64, 64)
        present = sorted(set(ia["label"].unique().tolist()) - {0})
        assert present and (np.flatnonzero(ia["cls_label"].numpy()) + 1).tolist() == present
        assert ia["label"].max() <= 5
    # different split or seed -> different images; the item does not depend on what was drawn before
    assert not torch.equal(a[0]["img"], DemoDataset("val", 12, 64, 3)[0]["img"])
    assert not torch.equal(a[0]["img"], DemoDataset("train", 12, 64, 4)[0]["img"])
    assert torch.equal(DemoDataset("train", 100, 64, 3, train=False)[11]["img"], a[11]["img"])


def test_demo_classes_are_balanced_and_visible():
    counts = np.zeros(6)
    for i in range(200):
        img, mask = generate_demo_image(np.random.default_rng(i), 64)
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        for k in np.unique(mask):
            counts[k] += 1
            if k:
                assert (mask == k).sum() >= 10  # every listed class is visible, not a sliver
    assert counts[0] == 200 and all(counts[1:] > 50)


def test_demo_train_items_are_cropped():
    ds = build_dataset("demo", "train", None, train=True, num_images=4, size=48, seed=0)
    item = ds[(0, 1, 2)]
    assert item["img"].shape == (3, 48, 48) and item["img_box"].dtype == torch.int64
    ds = build_dataset("demo", "train", None, train=True, crop_size=32, num_images=4, size=48)
    assert ds[0]["img"].shape == (3, 32, 32)


def test_write_demo_matches_in_memory(tmp_path):
    report = write_demo(tmp_path / "demo", num_train=6, num_val=3, size=40, seed=1)
    assert report.ok
    disk = VOCDataset(tmp_path / "demo", "val")
    mem = DemoDataset("val", 3, 40, 1, train=False)
    assert disk.class_names == list(DEMO_CLASSES) and disk.num_classes == 5 and len(disk) == 3
    for i in range(3):
        d, m = disk[i], mem[i]
        assert d["name"] == m["name"]
        assert torch.equal(d["img"], m["img"]) and torch.equal(d["label"], m["label"])
        assert torch.equal(d["cls_label"], m["cls_label"])
    assert len(build_dataset("demo", "train_aug", tmp_path / "demo", train=True, crop_size=32)) == 6


def test_demo_items_are_cached_read_only_and_augmented_as_generated(monkeypatch):
    import tscd.data.demo as demo

    cached = DemoDataset("train", num_images=5, size=48, seed=2)
    monkeypatch.setattr(demo, "DEMO_CACHE_MIB", 0)
    fresh = DemoDataset("train", num_images=5, size=48, seed=2)
    assert cached._cache is not None and fresh._cache is None
    calls = []
    real = demo.generate_demo_image
    monkeypatch.setattr(demo, "generate_demo_image", lambda *a: calls.append(1) or real(*a))
    for epoch in range(3):  # the cached item is generated once, the augmentation still drawn per (seed, epoch, i)
        for i in range(5):
            a, b = cached[(i, epoch, 7)], fresh[(i, epoch, 7)]
            assert torch.equal(a["img"], b["img"]) and torch.equal(a["label"], b["label"])
            assert torch.equal(a["img_box"], b["img_box"]) and torch.equal(a["cls_label"], b["cls_label"])
    assert len(calls) == 5 + 15  # cached: once per item; uncached: every access
    img, mask, cls_label = cached.load_raw(3)
    assert not (img.flags.writeable or mask.flags.writeable or cls_label.flags.writeable)
    assert not torch.equal(cached[(3, 0, 7)]["img"], cached[(3, 1, 7)]["img"])  # epochs still differ
