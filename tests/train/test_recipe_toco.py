"""``recipe: toco``: one iteration equals ToCo's official iteration (transcribed in tests/train/_toco_official.py)
term by term and in the gradient, before and after the warm-up, with the local crops drawn identically; the EMA
teacher equals the official after two steps; the shipped configs carry ToCo's official values."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from tests._utils import tiny_overrides
from tests.train import _toco_official as toco
from tscd.config import load_config
from tscd.kernels import dense_energy_loss
from tscd.method.recipes import Batch
from tscd.train import Trainer

ROOT = Path(__file__).resolve().parents[2]

#: crop 64 on the tiny ViT (patch 8: an 8x8 token grid), local crops of 16 px, small projection heads; padded
#: crops (scale_range < 1) so that the boxes matter; ToCo's thresholds
#: crop 64 on the tiny ViT (patch 8: an 8x8 token grid), local crops of 16 px, small projection heads; padded crops
#: (scale_range < 1) whose boxes start within the grid (the token label applies the pixel box to it); the low
#: threshold 0.35 (ToCo: 0.25) so that the random network's auxiliary CAM gives negative crops too
TINY = {"data": {"scale_range": [0.9, 1.0], "demo_num_train": 6, "demo_num_val": 2},
        "model": {"name": "toco_vit_tiny", "decoder_dim": 16, "drop_path_rate": 0.0},
        "pseudo": {"cam_scales": [1.0, 0.5, 1.5], "bkg_low": 0.35, "bkg_high": 0.7, "refine_iters": 10},
        "train": {"max_iters": 50, "cam_iters": 1, "seed": 2, "device": "cpu"}}
TOCO = ["recipe=toco", "toco.local_crop_size=16", "toco.local_crops=4", "toco.aux_layer=-2", "toco.proj_dim=32",
        "toco.proj_hidden=24", "toco.proj_bottleneck=8"]
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def _trainer(tmp_path, *extra: str) -> Trainer:
    logging.getLogger("tscd.models.vit").setLevel(logging.ERROR)
    torch.manual_seed(0)
    return Trainer(load_config(None, [*tiny_overrides(tmp_path / "run", TINY), *TOCO, *extra]), resume="never")


def _official_positions(roi: torch.Tensor, crop: int, num: int, perms: list[torch.Tensor]) -> torch.Tensor:
    """The official draw as top-left corners: candidates row-major (ROI <= 1 inside the margin, all positions when
    fewer than ``num``), the first ``num`` of each image's permutation."""
    m = crop // 2
    H, W = roi.shape[-2:]
    out = []
    for i, perm in enumerate(perms):
        inner = roi[i, m:H - m, m:W - m]
        cand = (inner <= 1).nonzero()
        if cand.shape[0] < num:
            cand = (inner >= 0).nonzero()
        out.append(cand[perm[:num]])
    return torch.stack(out)


def _crf(img255, probs, roi, label):
    return dense_energy_loss(img255, probs, roi, label, sigma_rgb=15.0, sigma_xy=100.0, scale=0.5, weight=1e-7,
                             gain="field", backend="cpp")


def _official(tr: Trainer, mb: Batch, iteration: int, perms) -> tuple[dict, dict, dict, torch.nn.Module]:
    """ToCo's terms, intermediates and gradients (network and student head) on copies of the trainer's modules."""
    cfg, T = tr.cfg, tr.cfg.recipe_cfg
    net = copy.deepcopy(tr.net).train()
    head_s, head_t = copy.deepcopy(tr.recipe.head), copy.deepcopy(tr.recipe.head_t.module)
    record: dict = {}
    terms = toco.toco_iteration(
        net, head_s, head_t, mb.img, mb.cls_label, mb.img_box, [mb.img, mb.views["view2"], mb.views["local"]],
        perms, iteration - 1, crf=_crf, scales=cfg.pseudo.cam_scales, bkg_thre=cfg.pseudo.cam_bkg,
        high_thre=cfg.pseudo.bkg_high, low_thre=cfg.pseudo.bkg_low, local_crop_size=T.local_crop_size,
        ncrops=T.local_crops + 2, temp=T.temp, momentum=T.momentum, w_ptc=T.ptc, w_ctc=T.ctc, w_seg=cfg.loss.seg,
        w_reg=cfg.loss.reg, warmup_iters=cfg.train.cam_iters, record=record)
    terms["total"].backward()
    grads = {f"net.{n}": p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in net.named_parameters() if p.requires_grad}
    grads.update({f"head.{n}": p.grad.clone() for n, p in head_s.named_parameters()})
    return {k: v.detach().item() for k, v in terms.items()}, record, grads, head_t


def _ours(tr: Trainer, batch: dict, iteration: int, positions: torch.Tensor) -> tuple[dict, dict]:
    """The trainer's terms and gradients at ``iteration`` with the official crop positions (the optimizer step is
    replaced by a capture: the weights stay)."""
    grads = {}

    def capture(*a, **k):
        grads.update({f"net.{n}": p.grad.clone() for n, p in tr.net.named_parameters() if p.requires_grad})
        grads.update({f"head.{n}": p.grad.clone() for n, p in tr.recipe.head.named_parameters()})

    tr.optimizer.step = capture
    tr.recipe.crop_positions = lambda roi: positions
    tr.iteration = iteration
    return tr.train_step(batch), grads


def _draw(tr: Trainer, mb: Batch, seed: int):
    """The official randperm draws of this batch (its ROI from a dry run of the transcription's CAM passes)."""
    T = tr.cfg.recipe_cfg
    with torch.no_grad():
        _, cams_aux = toco.multi_scale_cams2(copy.deepcopy(tr.net), mb.img, tr.cfg.pseudo.cam_scales)
    roi = toco.roi_mask(cams_aux, mb.cls_label, tr.cfg.pseudo.bkg_low, tr.cfg.pseudo.bkg_high)
    torch.manual_seed(seed)
    perms = [torch.randperm(n) for n in toco.candidate_count(roi, T.local_crop_size, T.local_crops)]
    return roi, perms


@pytest.mark.parametrize("official_code", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["official_code", "fast"])
@pytest.mark.parametrize("iteration", [2, 3], ids=["warm_up", "after_warm_up"])
def test_toco_iteration_is_the_official_one(tmp_path, official_code, iteration):
    tr = _trainer(tmp_path, f"train.reference_style={str(official_code).lower()}")
    batch = next(tr._batches())
    mb = tr._micro_batches(batch)[0]
    assert (mb.img_box[:, 1] - mb.img_box[:, 0]).min() < 64  # padded crops: the boxes are exercised
    roi, perms = _draw(tr, mb, seed=5)
    positions = _official_positions(roi.long(), tr.cfg.recipe_cfg.local_crop_size, tr.cfg.recipe_cfg.local_crops,
                                    perms)
    want, record, want_grads, want_teacher = _official(tr, mb, iteration, perms)
    got, got_grads = _ours(tr, batch, iteration, positions)
    # the terms the official weights 0 in the warm-up (seg, reg) are not computed there
    keys = {"cls", "cls_aux", "ptc", "ctc", "total"} | ({"seg", "reg"} if iteration > 2 else set())
    assert set(got) == keys, got
    flags = record["flags"][:, 2:]
    assert (flags == 0).any() and (flags == 1).any(), flags  # negative and positive local crops
    assert (record["ptc_label"] == 0).any() and ((record["ptc_label"] > 0) & (record["ptc_label"] < 255)).any()
    if iteration > 2:
        pseudo = record["pseudo_label"]
        assert (pseudo == 0).any() and ((pseudo > 0) & (pseudo < 255)).any()
    for k in keys:  # measured: 4e-7 on both paths
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), (k, got, want)
    flat_want = torch.cat([g.flatten() for g in want_grads.values()])
    flat_got = torch.cat([got_grads[n].flatten() for n in want_grads])
    assert set(got_grads) == set(want_grads)
    err = ((flat_got - flat_want).norm() / flat_want.norm()).item()
    assert err < 1e-5, err  # measured: 2e-7
    for name in ("head.weight_v", "net.encoder.blocks.0.attn.qkv.weight", "net.aux_classifier.weight"):
        g, w = got_grads[name], want_grads[name]
        assert ((g - w).norm() / w.norm()).item() < 1e-5, name
    if iteration > 2:
        assert want_grads["net.decoder.conv6.weight"].norm() > 0
    # the CAMs themselves (the fast path's scale-1 pass takes the images' CAMs from the trained forward)
    torch.testing.assert_close(tr.recipe.last["cam"], record["cams"][:1], rtol=1e-5, atol=1e-6)
    # the teacher head after this iteration's EMA update (the official updates it inside the forward)
    for t, w in zip(tr.recipe.head_t.parameters(), want_teacher.parameters(), strict=True):
        torch.testing.assert_close(t, w, rtol=0, atol=0)


def test_toco_crop_draw_matters(tmp_path):
    """The test above can fail: other crop positions change the CTC term."""
    tr = _trainer(tmp_path, "train.reference_style=true")
    batch = next(tr._batches())
    mb = tr._micro_batches(batch)[0]
    roi, perms = _draw(tr, mb, seed=5)
    _, perms2 = _draw(tr, mb, seed=6)
    want, *_ = _official(tr, mb, 3, perms)
    positions = _official_positions(roi.long(), tr.cfg.recipe_cfg.local_crop_size, tr.cfg.recipe_cfg.local_crops,
                                    perms2)
    got, _ = _ours(tr, batch, 3, positions)
    assert abs(got["ctc"] - want["ctc"]) > 1e-6


def test_toco_teacher_after_two_steps(tmp_path):
    """Two real optimizer steps: the teacher head is the official EMA of the student heads before each step."""
    tr = _trainer(tmp_path)
    batches = tr._batches()
    t0 = [p.clone() for p in tr.recipe.head_t.parameters()]
    students = []
    for it in (1, 2):
        students.append([p.detach().clone() for p in tr.recipe.head.parameters()])
        tr.iteration = it
        tr.train_step(next(batches))
    head_s, head_t = copy.deepcopy(tr.recipe.head), copy.deepcopy(tr.recipe.head_t.module)
    with torch.no_grad():
        for p, v in zip(head_t.parameters(), t0):
            p.copy_(v)
        for s in students:
            for p, v in zip(head_s.parameters(), s):
                p.copy_(v)
            toco.ema_update(head_s, head_t, tr.cfg.recipe_cfg.momentum)
    assert not torch.equal(students[0][0], students[1][0])  # the student moved
    for t, w in zip(tr.recipe.head_t.parameters(), head_t.parameters(), strict=True):
        torch.testing.assert_close(t, w, rtol=0, atol=0)


def test_shipped_toco_configs():
    voc = load_config(ROOT / "configs" / "toco_voc.yaml")
    coco = load_config(ROOT / "configs" / "toco_coco.yaml")
    for cfg in (voc, coco):
        T = cfg.recipe_cfg
        assert cfg.recipe == "toco" and cfg.model.name == "toco_vit_base" and cfg.pseudo.refine_mode == "par"
        assert (cfg.data.crop_size, cfg.model.pooling, cfg.model.drop_path_rate, cfg.model.decoder_dim) == \
            (448, "gmp", 0.0, 512)
        assert (cfg.loss.seg, cfg.loss.reg, cfg.loss.aff, cfg.loss.scd, cfg.loss.crf_gain) == \
            (0.1, 0.05, 0.0, 0.0, "field")
        assert (T.cls_aux, T.ptc, T.ctc, T.momentum, T.local_crops, T.local_crop_size, T.neg_ratio, T.aux_layer) == \
            (1.0, 0.2, 0.5, 0.9, 8, 96, 0.2, -3)
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_iters, cfg.optim.warmup_ratio,
                cfg.optim.power) == (6e-5, 0.01, 1500, 1e-6, 0.9)
        assert (cfg.pseudo.bkg_low, tuple(cfg.pseudo.cam_scales), cfg.train.amp) == (0.25, (1.0, 0.5, 1.5), "off")
    assert (voc.train.max_iters, voc.train.cam_iters, voc.data.batch_size, voc.pseudo.bkg_high, voc.pseudo.cam_bkg,
            voc.recipe_cfg.temp, voc.recipe_cfg.contrast_iters, voc.recipe_cfg.aux_label_iters) == \
        (20000, 2000, 4, 0.7, 0.5, 0.5, -1, -1)
    assert (coco.train.max_iters, coco.train.cam_iters, coco.data.batch_size, coco.pseudo.bkg_high,
            coco.pseudo.cam_bkg, coco.recipe_cfg.temp, coco.recipe_cfg.contrast_iters,
            coco.recipe_cfg.aux_label_iters) == (80000, 8000, 8, 0.65, 0.45, 1.0, 12000, 12000)


def _first_candidates(tr: Trainer):
    """Crop positions that depend on each image's ROI only (its first candidates, row-major): the same with any
    split of the batch."""
    from tscd.method.token_contrast import crop_candidates

    T = tr.cfg.recipe_cfg

    def positions(roi):
        cand = crop_candidates(roi, T.local_crop_size, T.local_crops)
        B, h, w = cand.shape
        keys = cand.flatten(1).float() * (2.0 - torch.arange(h * w) / (h * w))
        idx = keys.topk(T.local_crops, dim=1).indices
        return torch.stack([idx // w, idx % w], dim=-1)
    return positions


def test_toco_micro_batches_give_the_batch_gradient(tmp_path):
    """train.accum_steps=2 (one image per micro-batch): the same terms and gradient as the whole batch (the count
    terms, seg and PTC, normalised over the batch; PTC's constant split between the micro-batches)."""
    out = {}
    for accum in (1, 2):
        tr = _trainer(tmp_path / str(accum), f"train.accum_steps={accum}")
        tr.recipe.crop_positions = _first_candidates(tr)
        grads = {}
        tr.optimizer.step = lambda *a, tr=tr, grads=grads, **k: grads.update(
            {n: p.grad.clone() for n, p in [*tr.net.named_parameters(), *tr.recipe.head.named_parameters()]
             if p.requires_grad})
        tr.iteration = 3
        out[accum] = tr.train_step(next(tr._batches())), grads
    (v1, g1), (v2, g2) = out[1], out[2]
    assert set(v1) == set(v2) == {"cls", "cls_aux", "ptc", "ctc", "seg", "reg", "total"}
    for k in v1:
        assert v2[k] == pytest.approx(v1[k], rel=1e-5, abs=1e-7), (k, v1, v2)
    f1 = torch.cat([g.flatten() for g in g1.values()])
    f2 = torch.cat([g2[n].flatten() for n in g1])
    assert ((f2 - f1).norm() / f1.norm()).item() < 1e-5


@pytest.mark.slow
def test_toco_voc_config_trains_and_evaluates_from_the_command_line(tmp_path, capsys):
    """`tscd train --config configs/toco_voc.yaml` (demo data, the tiny ViT): ToCo's terms before and after the
    warm-up; `tscd eval`, `infer` and `pseudo-labels` take its checkpoint unchanged."""
    from tscd.cli import main
    from tscd.eval.metrics import read_metrics
    from tscd.train.checkpoint import list_checkpoints, load_checkpoint

    run = tmp_path / "toco"
    small = ["data.dataset=demo", "data.root=null", "data.train_split=train", "data.crop_size=64", "data.demo_size=64",
             "data.demo_num_train=8", "data.demo_num_val=2", "data.batch_size=2", "data.num_workers=0",
             "model.name=toco_vit_tiny", "model.pretrained=null", "model.decoder_dim=16", "pseudo.refine_iters=2",
             "train.cam_iters=1", "train.val_iters=0", "train.ckpt_iters=0", "train.tensorboard=false",
             "train.plots=false", "optim.warmup_iters=1", *TOCO[1:]]
    assert main(["train", "--config", str(ROOT / "configs" / "toco_voc.yaml"), "--run-dir", str(run),
                 "--max-iters", "4", *small]) == 0
    ckpt = list_checkpoints(run)[-1][1]
    state = load_checkpoint(ckpt)
    hist = state["history"]
    base = {"cls", "cls_aux", "ptc", "ctc"}
    assert [set(h) - {"iteration", "lr", "total"} for h in hist] == [base] * 2 + [base | {"seg", "reg"}] * 2
    assert any(k.startswith("head_t.") for k in state["recipe"])  # the teacher head is checkpointed
    assert load_config(run / "config.yaml").recipe == "toco"
    assert [r["iteration"] for r in read_metrics(run)] == [4]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev"), "--num-images", "2",
                 "--scales", "1,0.5", "--cam-scales", "1,0.5"]) == 0
    results = json.loads(next((tmp_path / "ev").glob("*.json")).read_text())["results"]
    assert {"seg", "cam"} <= set(results) and "aff" not in results
    assert main(["infer", "--checkpoint", str(ckpt), str(tmp_path / "none"), "--out", str(tmp_path / "m")]) == 2
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from PIL import Image
    Image.fromarray((torch.rand(45, 57, 3) * 255).to(torch.uint8).numpy()).save(img_dir / "a.png")
    assert main(["infer", "--checkpoint", str(ckpt), str(img_dir), "--out", str(tmp_path / "m"), "--cam"]) == 0
    assert Image.open(tmp_path / "m" / "a.png").size == (57, 45)
    assert main(["pseudo-labels", "--checkpoint", str(ckpt), "--split", "train", "--out", str(tmp_path / "pl"),
                 "--cam-scales", "1,0.5", "--num-images", "2"]) == 0
    assert len(list((tmp_path / "pl").glob("*.png"))) == 2


def test_toco_local_crop_must_fit(tmp_path):
    with pytest.raises(ValueError, match="toco.local_crop_size=64 does not fit"):
        _trainer(tmp_path, "toco.local_crop_size=64")


def test_toco_cam_switches_act(tmp_path, monkeypatch):
    """``pseudo.cam_flip: separate`` (two passes of B images: the same CAMs, ToCo's network has no BatchNorm) and
    ``pseudo.cam_amp: bf16`` (the passes under bf16 autocast: close, not equal) act in ToCo as in TSCD."""
    tr = _trainer(tmp_path)
    img = torch.randn(2, 3, 64, 64)
    want = tr.recipe.cams(img)
    sizes, dtypes = [], []
    real = tr.recipe._cam_fn

    def spy(x):
        sizes.append(x.shape[0])
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(x)

    monkeypatch.setattr(tr.recipe, "_cam_fn", spy)
    tr.cfg.pseudo.cam_flip = "separate"
    got = tr.recipe.cams(img)
    assert sizes == [2] * 6 and dtypes == [None] * 6  # three scales, image and flip apart, fp32
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    sizes.clear(), dtypes.clear()
    tr.cfg.pseudo.cam_flip, tr.cfg.pseudo.cam_amp = "together", "bf16"
    got = tr.recipe.cams(img)
    assert sizes == [4] * 3 and dtypes == [torch.bfloat16] * 3
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and 1e-4 < (g - w).abs().max() < 0.1
