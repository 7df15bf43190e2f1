import json

import numpy as np
import pytest
import torch

from tscd.data import CustomDataset, DataError, build_dataset

from ._make import make_mask, write_image, write_mask


def _images(folder, names=("a", "b", "c")):
    for k, n in enumerate(names):
        write_image(folder / f"{n}.jpg", 16, 20, seed=k)


def test_csv_labels_classes_from_file(tmp_path):
    _images(tmp_path / "images")
    (tmp_path / "labels.csv").write_text("image_id,labels\na,dog;cat\nb.jpg,cat\nc, dog \n")
    ds = CustomDataset(tmp_path / "images", tmp_path / "labels.csv", train=False)
    assert ds.class_names == ["background", "cat", "dog"] and ds.num_classes == 2
    assert ds.names == ["a", "b", "c"]
    assert ds[0]["cls_label"].tolist() == [1.0, 1.0]
    assert ds[1]["cls_label"].tolist() == [1.0, 0.0]
    assert ds[2]["cls_label"].tolist() == [0.0, 1.0]
    assert "label" not in ds[0] and ds[0]["img"].shape == (3, 16, 20)


def test_json_labels_with_explicit_classes_and_masks(tmp_path):
    _images(tmp_path / "images")
    (tmp_path / "labels.json").write_text(json.dumps({"a": ["car"], "b": ["person", "car"], "c": ["person"]}))
    for n, classes in (("a", [2]), ("b", [1, 2]), ("c", [1])):
        write_mask(tmp_path / "masks" / f"{n}.png", make_mask(16, 20, classes))
    (tmp_path / "classes.txt").write_text("background\nperson\ncar\n")
    ds = build_dataset("custom", "train", tmp_path, train=True, crop_size=24)
    assert ds.class_names == ["background", "person", "car"]
    item = ds[(1, 0, 0)]
    assert item["img"].shape == (3, 24, 24) and item["label"].shape == (24, 24)
    assert item["cls_label"].tolist() == [1.0, 1.0]
    val = CustomDataset(tmp_path / "images", tmp_path / "labels.json", mask_dir=tmp_path / "masks",
                        classes=["person", "car"])
    assert torch.equal(val[0]["label"], torch.from_numpy(make_mask(16, 20, [2])).long())


def test_json_with_classes_entry(tmp_path):
    _images(tmp_path / "images", ("a",))
    (tmp_path / "l.json").write_text(json.dumps({"classes": ["zebra", "ant"], "labels": {"a": ["ant"]}}))
    ds = CustomDataset(tmp_path / "images", tmp_path / "l.json")
    assert ds.class_names == ["background", "zebra", "ant"] and ds[0]["cls_label"].tolist() == [0.0, 1.0]


def test_custom_errors(tmp_path):
    _images(tmp_path / "images")
    labels = tmp_path / "labels.csv"
    labels.write_text("a,dog\nb,cat\nzz,dog\n")
    with pytest.raises(DataError, match="'zz'.*does not exist"):
        CustomDataset(tmp_path / "images", labels)
    ds = CustomDataset(tmp_path / "images", labels, skip_bad=True)
    assert len(ds) == 2 and ds.num_skipped == 1
    labels.write_text("a,dog\nb,unicorn\n")
    with pytest.raises(DataError, match="unknown class.*unicorn"):
        CustomDataset(tmp_path / "images", labels, classes=["dog", "cat"])
    labels.write_text("a,dog\nb,\n")
    with pytest.raises(DataError, match="'b' has an empty class vector"):
        CustomDataset(tmp_path / "images", labels, train=True, crop_size=8)
    labels.write_text("a,dog,cat\n")
    with pytest.raises(DataError, match="line 1.*';'"):
        CustomDataset(tmp_path / "images", labels)
    labels.write_text("a,dog\na,cat\n")
    with pytest.raises(DataError, match="appears twice"):
        CustomDataset(tmp_path / "images", labels)
    (tmp_path / "masks").mkdir()
    labels.write_text("a,dog\n")
    with pytest.raises(DataError, match="explicit class list"):
        CustomDataset(tmp_path / "images", labels, mask_dir=tmp_path / "masks")
    with pytest.raises(DataError, match=r"mask file .*a.png.*does not exist"):
        CustomDataset(tmp_path / "images", labels, mask_dir=tmp_path / "masks", classes=["dog"])
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        CustomDataset(tmp_path / "images", tmp_path / "missing.csv")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        CustomDataset(tmp_path / "images", tmp_path / "bad.json")
    bad_mask = make_mask(16, 20, [1])
    bad_mask[0, 0] = 7
    write_mask(tmp_path / "masks" / "a.png", bad_mask)
    with pytest.raises(DataError, match=r"a.png.*found \[7\]"):
        CustomDataset(tmp_path / "images", labels, mask_dir=tmp_path / "masks", classes=["dog"])[0]


def test_custom_split_files(tmp_path):
    _images(tmp_path / "images")
    (tmp_path / "labels_train.csv").write_text("a,x\nb,y\n")
    (tmp_path / "labels_val.csv").write_text("c,x\n")
    (tmp_path / "classes.txt").write_text("x\ny\n")
    assert len(build_dataset("custom", "train", tmp_path, train=False)) == 2
    assert build_dataset("custom", "val", tmp_path, train=False).names == ["c"]
    with pytest.raises(FileNotFoundError, match="labels_test"):
        build_dataset("custom", "test", tmp_path, train=False)
    assert np.isclose(build_dataset("custom", "val", tmp_path, train=False)[0]["cls_label"].sum(), 1)
