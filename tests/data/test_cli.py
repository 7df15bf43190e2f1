import json

from tscd.cli import main
from tscd.data import VOCDataset

from ._make import VOC_VAL, make_coco, make_voc, write_image


def test_data_demo_then_check(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["data", "demo", "--out", str(out), "--num-train", "4", "--num-val", "2", "--size", "32",
                 "--seed", "3"]) == 0
    assert "split train: 4 images" in capsys.readouterr().out
    assert len(VOCDataset(out, "train")) == 4
    assert main(["data", "check", "--dataset", "demo", "--root", str(out), "--num", "-1"]) == 0
    text = capsys.readouterr().out
    assert "split val: 2 usable entries" in text and "result: OK" in text


def test_data_voc_and_check(tmp_path, capsys):
    root = make_voc(tmp_path / "VOC2012")
    assert main(["data", "voc", "--root", str(root), "--workers", "2", "--check-images", "-1"]) == 0
    text = capsys.readouterr().out
    assert "split val: 2 ids" in text and "result: OK" in text
    assert main(["data", "check", "--dataset", "voc", "--root", str(root)]) == 0
    capsys.readouterr()
    (root / "JPEGImages" / f"{VOC_VAL[0]}.jpg").write_bytes(b"garbage")
    assert main(["data", "check", "--dataset", "voc", "--root", str(root), "--splits", "val"]) == 1
    text = capsys.readouterr().out
    assert f"{VOC_VAL[0]}.jpg" in text and "1 error(s)" in text


def test_data_voc_missing_root_and_check_missing(tmp_path, capsys):
    assert main(["data", "voc", "--root", str(tmp_path / "nope")]) == 2  # a user error, as in every command
    assert "nope" in capsys.readouterr().err
    assert main(["data", "check", "--dataset", "voc", "--root", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_data_coco_and_custom_check(tmp_path, capsys):
    root = tmp_path / "coco"
    make_coco(root, "train")
    make_coco(root, "val")
    assert main(["data", "coco", "--root", str(root), "--workers", "1"]) == 0
    assert json.loads((root / "cls_labels.json").read_text())["classes"][0] == "background"
    assert main(["data", "check", "--dataset", "coco", "--root", str(root)]) == 0
    custom = tmp_path / "custom"
    (custom / "images").mkdir(parents=True)
    write_image(custom / "images" / "x.png", 8, 8)
    (custom / "labels.csv").write_text("x,cat\ny,dog\n")
    assert main(["data", "check", "--dataset", "custom", "--root", str(custom)]) == 1
    assert "'y'" in capsys.readouterr().out


def test_data_without_subcommand_prints_help(capsys):
    assert main(["data"]) == 2
