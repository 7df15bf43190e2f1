"""The run pictures: validation grid and training curves are real PNGs with the expected content; validation results
are data (metrics.jsonl), which the curves read."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests._utils import write_tiny_config
from tscd import visualize as viz
from tscd.data.classes import DEMO_CLASSES, PALETTE
from tscd.eval.metrics import append_metrics, read_metrics


def _rows(n: int, size: int = 24) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        gt = np.zeros((size, size), dtype=np.int64)
        gt[4:12, 4:12] = 2
        pseudo = gt.copy()
        pseudo[0, :] = 255
        rows.append({"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                     "cam": rng.random((size, size)), "pseudo": pseudo, "pred": gt, "gt": gt})
    return rows


def test_colorize_uses_the_palette_and_white_for_uncertain():
    lab = np.array([[0, 1], [2, 255]])
    rgb = viz.colorize(lab, PALETTE)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == tuple(PALETTE[3:6]) and tuple(rgb[1, 0]) == tuple(PALETTE[6:9])
    assert tuple(rgb[1, 1]) == (255, 255, 255)
    with pytest.raises(ValueError, match="0..255"):
        viz.colorize(np.array([[256]]), PALETTE)


def test_grid_png_has_one_row_per_image_and_the_legend(tmp_path, monkeypatch):
    legends = []
    import matplotlib.figure

    orig = matplotlib.figure.Figure.legend

    def spy(self, *a, **k):
        legends.append([h.get_label() for h in k["handles"]])
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", spy)
    p2 = viz.save_grid(tmp_path / "g2.png", _rows(2), DEMO_CLASSES, PALETTE, dpi=50)
    p4 = viz.save_grid(tmp_path / "sub" / "g4.png", _rows(4), DEMO_CLASSES, PALETTE, dpi=50)
    with Image.open(p2) as a, Image.open(p4) as b:
        assert a.format == b.format == "PNG"
        # 5 columns of 1.5 in at 50 dpi; each extra row adds 1.5 in
        assert a.size[0] == b.size[0] == round(5 * 1.5 * 50)
        assert b.size[1] - a.size[1] == round(2 * 1.5 * 50)
        # not blank: the cells hold the palette colours
        px = np.asarray(b.convert("RGB")).reshape(-1, 3)
        assert (px == np.asarray(PALETTE[6:9], dtype=np.uint8)).all(1).sum() > 50
    assert legends[0] == [*DEMO_CLASSES, "uncertain (255)"]


def test_grid_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        viz.save_grid(tmp_path / "g.png", [], DEMO_CLASSES, PALETTE)
    row = _rows(1)[0]
    del row["pred"]
    with pytest.raises(ValueError, match="pred"):
        viz.save_grid(tmp_path / "g.png", [row], DEMO_CLASSES, PALETTE)


def test_grid_draws_the_columns_the_rows_have(tmp_path):
    """tscd infer's rows (no pseudo label, no ground truth, the CAM as an RGB picture) give 3 columns; rows whose
    columns differ are refused."""
    rows = [{"image": r["image"], "cam": np.full((24, 24, 3), 200, np.uint8), "pred": r["pred"]} for r in _rows(2)]
    with Image.open(viz.save_grid(tmp_path / "g.png", rows, DEMO_CLASSES, PALETTE, dpi=50)) as im:
        assert im.size[0] == round(3 * 1.5 * 50)
        assert (np.asarray(im.convert("RGB")).reshape(-1, 3) == 200).all(1).sum() > 100  # the picture, as it is
    only = [{"image": r["image"], "pred": r["pred"]} for r in _rows(1)]
    with Image.open(viz.save_grid(tmp_path / "g2.png", only, DEMO_CLASSES, PALETTE, dpi=50)) as im:
        assert im.size[0] == round(3 * 1.5 * 50)  # at least 3 cells wide, for the legend
    mixed = _rows(2)
    del mixed[1]["gt"]
    with pytest.raises(ValueError, match="row 1 has columns"):
        viz.save_grid(tmp_path / "g3.png", mixed, DEMO_CLASSES, PALETTE)


def test_class_names_for_known_and_custom_datasets():
    assert viz.class_names_for("demo", 5) == list(DEMO_CLASSES)
    assert viz.class_names_for("voc", 20)[15] == "person"
    assert viz.class_names_for("folder", 2) == ["background", "class 1", "class 2"]
    assert viz.class_names_for("voc", 3) == ["background", "class 1", "class 2", "class 3"]  # not VOC's count


def _report(seg: float, cam: float, pseudo: float) -> dict:
    results = {o: {"miou": v, "iou": {"background": v, "disc": None}} for o, v in
               (("seg", seg), ("cam", cam), ("pseudo", pseudo))}
    return {"num_images": 50, "protocol": "native", "results": results}


def test_metrics_jsonl_is_appended_and_read_back_last_record_wins(tmp_path):
    append_metrics(tmp_path, 100, _report(10.0, 20.5, 30.25), split="val")
    append_metrics(tmp_path, 200, _report(40.0, 41.0, float("nan")), split="val")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 300, "protoc')  # a write cut short by a kill
    append_metrics(tmp_path, 100, _report(11.0, 21.0, 31.0), split="val")  # a resumed run validates again
    records = read_metrics(tmp_path)
    assert [(r["iteration"], r["miou"]["seg"]) for r in records] == [(100, 11.0), (200, 40.0)]
    assert records[1]["miou"]["pseudo"] is None and records[0]["iou"]["cam"] == {"background": 21.0, "disc": None}
    assert records[0]["protocol"] == "native" and records[0]["split"] == "val" and records[0]["num_images"] == 50
    assert read_metrics(tmp_path / "metrics.jsonl", protocol="ms") == [] and read_metrics(tmp_path / "none") == []


def test_curves_png_plots_every_loss_term_lr_and_miou(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    orig = matplotlib.axes.Axes.plot

    def spy(self, *a, **k):
        labels.append(k.get("label"))
        return orig(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    hist = [{"iteration": i, "cls": 1.0 / i, "total": 1.0 / i, "lr": 1e-3 * (1 - i / 100)} for i in range(1, 50)]
    hist += [{"iteration": i, "cls": 0.1, "seg": 0.5, "scd": 0.2, "reg": 0.05, "aff": 0.3, "total": 1.0,
              "lr": 1e-3 * (1 - i / 100)} for i in range(50, 100)]
    val = [{"iteration": 50, "miou": {"seg": 20.0, "cam": 30.0, "pseudo": 35.0}},
           {"iteration": 99, "miou": {"seg": 60.0, "cam": 50.0, "pseudo": 65.0}}]
    p = viz.save_curves(tmp_path / "c.png", hist, val, dpi=50)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (13 * 50, round(3.6 * 50))
    assert {"cls", "seg", "aff", "reg", "scd", "total"} <= set(labels) and "er" not in labels
    assert {"segmentation head", "CAM label", "pseudo label"} <= set(labels)
    with pytest.raises(ValueError, match="empty history"):
        viz.save_curves(tmp_path / "d.png", [], val)


TINY = {"data": {"crop_size": 48, "scale_range": [0.9, 1.1], "demo_num_val": 3, "demo_size": 48, "val_num": None},
        "model": {"decoder_dim": 16, "drop_path_rate": 0.1}, "pseudo": {"cam_scales": [1.0], "refine_iters": 2},
        "loss": {"scd_samples": 4}, "optim": {"warmup_iters": 1},
        "train": {"max_iters": 3, "cam_iters": 1, "val_iters": 2, "ckpt_iters": 100}}


@pytest.mark.slow
@pytest.mark.parametrize("plots", [True, False])
def test_tscd_train_writes_and_prints_the_pictures(tmp_path, capsys, plots):
    from tscd.cli import main

    cfg = write_tiny_config(tmp_path / "tiny.yaml", TINY)
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), f"train.plots={str(plots).lower()}"]) == 0
    out = capsys.readouterr().out
    grid, curves = run / "val_grid.png", run / "curves.png"
    if not plots:
        assert not grid.exists() and not curves.exists() and "picture" not in out
        return
    assert f"picture (grid): {grid}" in out and f"picture (curves): {curves}" in out
    with Image.open(grid) as g, Image.open(curves) as c:
        assert g.format == c.format == "PNG"
        assert g.size[0] == round(5 * 1.5 * 80) and g.size[1] > 3 * 1.5 * 80  # 3 val images, 5 columns
        assert c.size == (13 * 80, round(3.6 * 80))
    # the validations at iterations 2 and 3 are both in the data the curves read
    assert [(v["iteration"], v["protocol"], sorted(v["miou"])) for v in read_metrics(run)] == \
        [(2, "native", ["cam", "pseudo", "seg"]), (3, "native", ["cam", "pseudo", "seg"])]
