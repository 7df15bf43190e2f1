import json

import numpy as np
import pytest
from PIL import Image

from tscd.data import COCODataset, DataError, build_dataset, prepare_coco
from tscd.data.classes import COCO_CLASSES, COCO_ID_TO_CLASS
from tscd.data.coco import render_mask

from ._make import box_mask, compressed_rle, make_coco, rect_polygon


def test_category_remap():
    assert len(COCO_ID_TO_CLASS) == 80 and COCO_ID_TO_CLASS[1] == 1 and COCO_ID_TO_CLASS[90] == 80
    assert COCO_ID_TO_CLASS[13] == 12 and 12 not in COCO_ID_TO_CLASS and COCO_CLASSES[80] == "toothbrush"


def test_render_rules():
    anns = [{"id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rect_polygon(0, 0, 19, 19)},
            {"id": 2, "category_id": 90, "iscrowd": 0, "segmentation": compressed_rle(box_mask(20, 20, 5, 9, 5, 9))}]
    for order in (anns, anns[::-1]):  # the JSON order does not matter: smaller on top
        m = render_mask(order, 20, 20)
        assert m[7, 7] == 80 and m[15, 15] == 1
    with pytest.raises(DataError, match="category id 12"):
        render_mask([{"id": 3, "category_id": 12, "iscrowd": 0, "segmentation": []}], 20, 20)


def test_prepare_coco_masks_lists_vectors(tmp_path):
    root = tmp_path / "coco"
    names = make_coco(root, "train")
    make_coco(root, "val")
    report = prepare_coco(root, workers=1, check_images=-1)
    assert report.ok, report.format()
    stems = {i: n[:-4] for i, n in names.items()}
    m1 = np.asarray(Image.open(root / "SegmentationClass" / "train2014" / f"{stems[1]}.png"))
    assert m1.shape == (40, 50)
    assert m1[15, 15] == 17  # dog (id 18 -> class 17) painted over the person
    assert m1[25, 30] == 1  # person
    assert m1[33, 20] == 1  # person over the crowd region
    assert m1[38, 20] == 255  # crowd
    assert m1[2, 2] == 0
    m2 = np.asarray(Image.open(root / "SegmentationClass" / "train2014" / f"{stems[2]}.png"))
    assert m2[5, 5] == 80 and m2[20, 20] == 3 and m2[0, 29] == 0
    train = (root / "splits" / "train.txt").read_text().split()
    val = (root / "splits" / "val.txt").read_text().split()
    assert train == [stems[1], stems[2]]  # image 3 (none) and 4 (crowd only) excluded
    assert stems[4].replace("train", "val") in val and stems[3].replace("train", "val") not in val
    labels = json.loads((root / "cls_labels.json").read_text())["labels"]
    assert labels[stems[1]] == [1, 17] and labels[stems[2]] == [3, 80]
    assert labels[stems[4].replace("train", "val")] == []

    ds = COCODataset(root, "train", train=True, crop_size=24)
    assert ds.num_classes == 80 and len(ds.class_names) == 81
    item = ds[(0, 0, 0)]
    assert item["img"].shape == (3, 24, 24) and item["label"].shape == (24, 24)
    val_ds = build_dataset("coco", "val", root, train=False)
    assert len(val_ds) == 3 and val_ds[2]["cls_label"].sum() == 0  # empty vectors allowed for evaluation
    with pytest.raises(DataError, match="empty class vector"):
        build_dataset("coco", "val", root, train=True, crop_size=16)


def test_prepare_coco_resumes_and_uses_workers(tmp_path):
    root = tmp_path / "coco"
    names = make_coco(root, "train")
    first = prepare_coco(root, workers=2, splits=["train"], check_images=0)
    assert first.ok and any("2 mask(s) written" in line for line in first.lines)
    mask_file = root / "SegmentationClass" / "train2014" / f"{names[2][:-4]}.png"
    before = mask_file.read_bytes()
    (root / "SegmentationClass" / "train2014" / f"{names[1][:-4]}.png").unlink()
    second = prepare_coco(root, workers=1, splits=["train"], check_images=0)
    assert any("1 mask(s) written, 1 already present" in line for line in second.lines)
    assert mask_file.read_bytes() == before


def test_prepare_coco_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare_coco(tmp_path / "nowhere")
    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        prepare_coco(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="tscd data coco"):
        COCODataset(tmp_path / "c", "train")
    root = tmp_path / "coco"
    names = make_coco(root, "train")
    (root / "train2014" / names[2]).unlink()
    report = prepare_coco(root, splits=["train"], check_images=0)
    assert not report.ok and any(names[2] in e for e in report.errors)
