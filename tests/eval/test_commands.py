"""`tscd eval`, `tscd infer`, `tscd pseudo-labels` end to end on small data written by the tests."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tscd.kernels
from tscd.cli import main

from .conftest import ODD_SIZES, save_checkpoint

FAST = ["--scales", "1,0.5", "--cam-scales", "1,0.5"]


def fake_dense_crf(image, probs, *, num_iter=10, gauss_sxy=3, gauss_compat=3, bilateral_sxy=64, bilateral_srgb=5,
                   bilateral_compat=4, backend="auto"):
    """Stand-in for tscd.kernels.dense_crf: checks the contract, returns a deterministic refinement."""
    assert image.ndim == 4 and image.shape[1] == 3 and image.shape[-2:] == probs.shape[-2:]
    assert float(image.max()) > 1.0  # the 0..255 scale
    assert torch.allclose(probs.sum(1), torch.ones_like(probs[:, 0]), atol=1e-4)
    assert (num_iter, gauss_sxy, gauss_compat, bilateral_sxy, bilateral_srgb, bilateral_compat) == (10, 3, 3, 64, 5, 4)
    out = torch.zeros_like(probs)
    out[:, 0] = 1.0  # everything background: easy to recognise
    return out


def test_eval_demo_writes_table_json_csv(checkpoint, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["eval", "--checkpoint", str(checkpoint), "--split", "val", "--out", str(out), "--resize-long", "64",
               "--save-preds", "--protocol", "ms", *FAST])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mIoU" in text and "seg MS+flip" in text and "CAM+aff RW" in text and "disc" in text
    assert "protocol ms+custom" in text
    report = json.loads((out / "results_val_ms-custom.json").read_text())
    assert report["protocol"] == "ms+custom" and report["settings"]["resize_long"] == 64
    assert set(report["results"]) == {"seg", "seg_ms", "cam", "aff"}
    assert report["num_images"] == 3 and report["split"] == "val" and report["iteration"] == 7
    for scores in report["results"].values():
        assert 0.0 <= scores["miou"] <= 100.0
    rows = list(csv.reader((out / "results_val_ms-custom.csv").open()))
    assert rows[0] == ["metric", "seg", "seg_ms", "cam", "aff"] and rows[1][0] == "miou"
    pngs = sorted(p.name for p in (out / "pred_val_ms-custom" / "seg_ms").iterdir())
    assert pngs == [f"demo_val_{i:05d}.png" for i in range(3)]
    assert Image.open(out / "pred_val_ms-custom" / "seg_ms" / pngs[0]).mode == "P"


def test_eval_odd_sizes_train_outputs_and_crf(checkpoint, odd_root, tmp_path, monkeypatch):
    monkeypatch.setattr(tscd.kernels, "dense_crf", fake_dense_crf, raising=False)
    out = tmp_path / "ev"
    rc = main(["eval", "--checkpoint", str(checkpoint), "--dataset", "demo", "--root", str(odd_root), "--split",
               "val", "--out", str(out), "--resize-long", "96", "--crf", "--crf-workers", "2", "--save-preds",
               "--outputs", "seg,seg_ms,cam,aff,pseudo", "--protocol", "ms", *FAST])
    assert rc == 0
    report = json.loads((out / "results_val_ms-custom.json").read_text())
    assert list(report["results"]) == ["seg", "seg_ms", "seg_ms_crf", "cam", "aff", "pseudo"]
    for i, (h, w) in enumerate(ODD_SIZES):
        for o in report["results"]:
            pred = np.asarray(Image.open(out / "pred_val_ms-custom" / o / f"odd_{i}.png"))
            assert pred.shape == (h, w), o
            if o == "seg_ms_crf":
                assert (pred == 0).all()  # the stand-in's answer went through
    # the CRF's all-background answer scores the background IoU only where background was predicted
    assert report["results"]["seg_ms_crf"]["iou"]["disc"] in (0.0, None)


def test_eval_crf_missing_is_a_clear_error(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.delattr(tscd.kernels, "dense_crf", raising=False)
    rc = main(["eval", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--crf", "--resize-long", "64"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "tscd.kernels.dense_crf" in err and "--crf" in err


@pytest.mark.parametrize("case", ["missing", "classes", "split", "outputs"])
def test_eval_cli_errors(case, checkpoint, tmp_path, capsys):
    ckpt = checkpoint
    extra = []
    if case == "missing":
        ckpt, expect = tmp_path / "none.pt", "does not exist"
    elif case == "classes":
        ckpt = tmp_path / "c3.pt"
        save_checkpoint(ckpt, num_classes=3)
        expect = "trained with 3 foreground classes, but dataset 'demo'"
    elif case == "split":
        extra, expect = ["--split", "tset"], "'tset'"
    else:
        extra, expect = ["--outputs", "seg,segms"], "--outputs"
    rc = main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert expect in err
    if case == "split":
        assert "--split" in err


def test_infer_folder_resumable(checkpoint, odd_root, tmp_path):
    out = tmp_path / "masks"
    args = ["infer", "--checkpoint", str(checkpoint), str(odd_root / "JPEGImages"), "--out", str(out),
            "--resize-long", "96", "--overlay", "--cam", "--batch-size", "2", *FAST]
    assert main(args) == 0
    for i, (h, w) in enumerate(ODD_SIZES):
        mask = Image.open(out / f"odd_{i}.png")
        assert mask.mode == "P" and mask.size == (w, h)
        assert mask.getpalette()[3:6] == [128, 0, 0]  # VOC colour of class 1
        for sub in ("overlay", "cam"):
            im = Image.open(out / sub / f"odd_{i}.png")
            assert im.mode == "RGB" and im.size == (w, h)
    before = (out / "odd_0.png").stat().st_mtime_ns
    (out / "cam" / "odd_1.png").unlink()
    assert main(args) == 0
    assert (out / "odd_0.png").stat().st_mtime_ns == before  # finished image skipped
    assert (out / "cam" / "odd_1.png").is_file()  # unfinished image redone


def test_infer_errors(checkpoint, tmp_path, capsys):
    assert main(["infer", "--checkpoint", str(checkpoint), str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pseudo_labels_export(checkpoint, tmp_path, capsys):
    out = tmp_path / "pl"
    assert main(["pseudo-labels", "--checkpoint", str(checkpoint), "--split", "train", "--out", str(out),
                 "--cam-scales", "1,0.5", "--num-images", "2"]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["demo_train_00000.png", "demo_train_00001.png"]
    label = np.asarray(Image.open(files[0]))
    assert label.shape == (64, 64) and set(np.unique(label)) <= {0, 1, 2, 3, 4, 5, 255}
    assert "mIoU" in capsys.readouterr().out
    assert main(["pseudo-labels", "--checkpoint", str(checkpoint), "--split", "train", "--out", str(out),
                 "--num-images", "2"]) == 0
    assert "0 pseudo label(s) written, 2 already done" in capsys.readouterr().out


def test_eval_never_overwrites_results_silently(checkpoint, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", "--checkpoint", str(checkpoint), "--out", str(out), "--outputs", "seg,cam", "--num-images", "1"]
    assert main(args) == 0
    assert main(args) == 0
    assert main([*args, "--protocol", "ms", "--resize-long", "64", *FAST]) == 0
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["results_val_ms-custom.json", "results_val_native.2.json", "results_val_native.json"]
    assert main([*args, "--overwrite"]) == 0
    assert len(list(out.glob("*.json"))) == 3
    text = capsys.readouterr().out
    assert text.count("protocol native:") == 3 and "protocol ms+custom:" in text
    report = json.loads((out / "results_val_native.json").read_text())
    assert report["settings"]["resize_long"] is None and report["settings"]["seg_scales"] == [1.0, 0.5, 0.75]


def test_evaluate_native_protocol_is_training_validation(checkpoint):
    """The native protocol scores what training validation always scored: seg at the native size, the CAM label of
    multi_scale_cam at pseudo.cam_scales (+ flip); batching does not change the numbers."""
    from tscd.data.demo import DemoDataset
    from tscd.eval.evaluator import evaluate, protocol_settings
    from tscd.eval.inference import load_model
    from tscd.eval.metrics import ConfusionMatrix
    from tscd.method import cam_to_label
    from tscd.models import multi_scale_cam

    loaded = load_model(checkpoint)
    cfg, model = loaded.config, loaded.model
    ds = DemoDataset("val", 3, 64)
    settings = protocol_settings("native", cfg, outputs=("seg", "cam"))
    assert settings.protocol == "native" and settings.resize_long is None and settings.batch_size > 1
    got = evaluate(model, ds, settings, progress=False)["results"]
    one = evaluate(model, ds, protocol_settings("native", cfg, outputs=("seg", "cam"), batch_size=1),
                   progress=False)["results"]
    mats = {k: ConfusionMatrix(ds.num_classes + 1) for k in ("seg", "cam")}
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            img, label, cls = item["img"][None], item["label"][None], item["cls_label"][None]
            out = model(img)
            seg = torch.nn.functional.interpolate(out.seg_logits, size=img.shape[-2:], mode="bilinear",
                                                  align_corners=False)
            mats["seg"].update(seg.argmax(1), label)
            cams = multi_scale_cam(model, img, cfg.pseudo.cam_scales)
            mats["cam"].update(cam_to_label(cams, cls, cfg.pseudo.cam_bkg), label)
    for k in ("seg", "cam"):
        assert got[k]["miou"] == pytest.approx(mats[k].scores()["miou"], abs=1e-6), k
        assert one[k]["miou"] == pytest.approx(got[k]["miou"], abs=1e-6), k
    with pytest.raises(ValueError, match="unknown protocol 'official'"):
        protocol_settings("official", cfg)


@pytest.mark.parametrize("form", ["anywhere", "set"])
def test_infer_and_pseudo_labels_take_overrides_anywhere(form, checkpoint, odd_root, tmp_path, capsys):
    """The same grammar as train and eval: an override that does not fit the weights proves it was applied."""
    bad = ["model.decoder_dim=48"] if form == "anywhere" else ["--set", "model.decoder_dim=48"]
    rc = main(["infer", *bad, "--checkpoint", str(checkpoint), str(odd_root / "JPEGImages"), "--out",
               str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 2 and "decoder" in err
    assert ("deprecated" in err) == (form == "set")
    rc = main(["pseudo-labels", "--checkpoint", str(checkpoint), *bad, "--out", str(tmp_path / "p"), "--split",
               "train"])
    assert rc == 2 and "decoder" in capsys.readouterr().err
