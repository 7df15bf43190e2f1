import json

import numpy as np
import pytest
import torch
from PIL import Image

from tscd.data import DataError, VOCDataset, build_dataset, prepare_voc
from tscd.data.classes import VOC_CLASSES

from ._make import VOC_ITEMS, VOC_TRAIN, VOC_VAL, make_mask, make_voc, write_image, write_mask


@pytest.fixture
def voc(tmp_path):
    root = make_voc(tmp_path / "VOC2012")
    report = prepare_voc(root, workers=1, check_images=-1)
    assert report.ok, report.format()
    return root


def test_prepare_writes_lists_and_class_vectors(voc):
    lists = {s: (voc / "splits" / f"{s}.txt").read_text().split() for s in ("train_aug", "train", "val")}
    assert lists["val"] == VOC_VAL and lists["train"] == VOC_TRAIN
    assert lists["train_aug"] == sorted(set(VOC_ITEMS) - set(VOC_VAL))
    data = json.loads((voc / "cls_labels.json").read_text())
    assert data["classes"] == list(VOC_CLASSES)
    assert {k: v for k, v in data["labels"].items()} == {k: sorted(c) for k, (_, _, c) in VOC_ITEMS.items()}


def test_prepare_without_official_lists_warns(tmp_path):
    root = make_voc(tmp_path / "v", official=False)
    report = prepare_voc(root, check_images=0)
    assert report.ok and any("no official val list" in w for w in report.warnings)
    assert len((root / "splits" / "train_aug.txt").read_text().split()) == len(VOC_ITEMS)
    assert not (root / "splits" / "val.txt").exists()


def test_voc_items(voc):
    ds = VOCDataset(voc, "val", train=False)
    assert ds.num_classes == 20 and ds.class_names[0] == "background" and len(ds.class_names) == 21
    assert len(ds.palette) == 768 and len(ds) == 2
    item = ds[0]
    h, w, classes = VOC_ITEMS[item["name"]]
    assert item["img"].shape == (3, h, w) and item["img"].dtype == torch.float32
    assert item["label"].shape == (h, w) and item["label"].dtype == torch.int64
    assert item["cls_label"].dtype == torch.float32 and item["cls_label"].shape == (20,)
    assert sorted((np.flatnonzero(item["cls_label"].numpy()) + 1).tolist()) == sorted(classes)
    assert item["img_box"].tolist() == [0, h, 0, w]
    assert torch.equal(item["label"], torch.from_numpy(make_mask(h, w, classes)).long())

    train = build_dataset("voc", "train_aug", str(voc), train=True, crop_size=32)
    item = train[(1, 0, 5)]
    assert item["img"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    top, bottom, left, right = item["img_box"].tolist()
    assert (item["label"][:top] == 255).all() and (item["label"][bottom:] == 255).all()


def test_missing_root_split_and_class_file(tmp_path, voc):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VOCDataset(tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match="split list for split 'test'.*tscd data voc"):
        VOCDataset(voc, "test")
    (voc / "cls_labels.json").unlink()
    with pytest.raises(FileNotFoundError, match="cls_labels.json"):
        VOCDataset(voc, "val")
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        prepare_voc(tmp_path)  # the first missing folder is named
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug"):
        prepare_voc(tmp_path)


def test_id_without_image(voc):
    (voc / "splits" / "extra.txt").write_text("2007_000001\n2099_999999\n")
    with pytest.raises(DataError, match="2099_999999"):
        VOCDataset(voc, "extra")
    # the id also lacks a class vector; with skip_bad both are counted warnings
    ds = VOCDataset(voc, "extra", skip_bad=True)
    assert len(ds) == 1 and ds.num_skipped == 1


def test_corrupt_and_truncated_jpeg(voc):
    ds = VOCDataset(voc, "val")
    good = voc / "JPEGImages" / "2008_000004.jpg"
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match="2008_000004.jpg"):
        ds[0]
    good.write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="2008_000004.jpg"):
        ds[0]
    # skip_bad: the next sample is returned, the skip is counted
    ds_skip = VOCDataset(voc, "val", skip_bad=True)
    assert ds_skip[0]["name"] == "2008_000005" and ds_skip.num_skipped == 1
    # the check report catches it too
    report = prepare_voc(voc, check_images=-1)
    assert not report.ok and any("2008_000004.jpg" in e for e in report.errors)


def test_mask_size_mismatch_and_bad_values(voc):
    h, w, classes = VOC_ITEMS["2008_000005"]
    write_mask(voc / "SegmentationClassAug" / "2008_000005.png", make_mask(h + 1, w, classes))
    ds = VOCDataset(voc, "val")
    with pytest.raises(DataError, match=r"2008_000005.png.*size"):
        ds[1]
    bad = make_mask(h, w, classes)
    bad[0, 0] = 21
    write_mask(voc / "SegmentationClassAug" / "2008_000005.png", bad)
    with pytest.raises(DataError, match=r"2008_000005.png.*values must be in 0..20 or 255, found \[21\]"):
        ds[1]
    report = prepare_voc(voc, check_images=0)
    assert not report.ok and any("2008_000005.png" in e for e in report.errors)
    # a bad mask is left out of the lists, and the report says the val list references it
    assert any("val.txt" in e and "2008_000005" in e for e in report.errors)


def test_rgb_mask_rejected(voc):
    h, w, _ = VOC_ITEMS["2008_000005"]
    Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8)).save(voc / "SegmentationClassAug" / "2008_000005.png")
    with pytest.raises(DataError, match="mode RGB"):
        VOCDataset(voc, "val")[1]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_non_rgb_images_are_converted(voc, mode):
    h, w, _ = VOC_ITEMS["2008_000004"]
    path = voc / "JPEGImages" / "2008_000004.jpg"
    path.unlink()
    ext = "jpg" if mode in ("L", "CMYK") else "png"
    write_image(voc / "JPEGImages" / f"2008_000004.{ext}", h, w, mode=mode)
    item = VOCDataset(voc, "val")[0]
    assert item["img"].shape == (3, h, w)


def test_empty_label_vector(tmp_path):
    items = dict(VOC_ITEMS)
    items["2010_000007"] = (20, 20, [])  # background (and ignore) only
    root = make_voc(tmp_path / "v", items)
    report = prepare_voc(root, check_images=0)
    assert any("no foreground class" in w for w in report.warnings)
    with pytest.raises(DataError, match="2010_000007.*empty class vector"):
        VOCDataset(root, "train_aug", train=True, crop_size=16)
    ds = VOCDataset(root, "train_aug", train=True, crop_size=16, skip_bad=True)
    assert ds.num_skipped == 1 and "2010_000007" not in ds.names
    assert "2010_000007" in VOCDataset(root, "train_aug", train=False).names  # evaluation accepts it


def test_stale_class_vectors_detected(voc):
    data = json.loads((voc / "cls_labels.json").read_text())
    data["labels"]["2008_000004"] = [1]
    (voc / "cls_labels.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="stale"):
        VOCDataset(voc, "val")[0]
