"""``recipe: afa`` trains AFA's official iteration: one post-warm-up iteration and one after the label switch, re-run
with an independent transcription of AFA's objective (``_afa_official.py``) on a copy of the same network: every
loss term, every label and the whole gradient agree. In the official-code mode (full-network CAM passes, the
torch ops) the only difference left is float rounding between two PAR implementations; the default fast path adds
the fused kernels' rounding."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from tests._utils import tiny_overrides
from tests.train import _afa_official as afa
from tscd.config import load_config
from tscd.kernels import dense_energy_loss
from tscd.method.recipes import Batch
from tscd.train import Trainer

ROOT = Path(__file__).resolve().parents[2]

#: crop 64 (the 1.5x CAM pass then has a 6x6 grid, as AFA's size arithmetic requires), batch 2 (AFA's per GPU);
#: scale_range < 1: padded crops, so the boxes matter
#: the random walk's radius 1 (AFA: 8; the same key, loss.aff_radius, sets both its walk and its affinity
#: label): a random-init network's affinity then leaves the propagated label foreground and background pixels
TINY = {"data": {"scale_range": [0.6, 0.8], "demo_num_train": 6, "demo_num_val": 2},
        "model": {"decoder_dim": 16, "drop_path_rate": 0.0}, "pseudo": {"cam_scales": [1.0, 0.5, 1.5]},
        "loss": {"aff_radius": 1}, "train": {"max_iters": 50, "cam_iters": 1, "seed": 2, "device": "cpu"}}
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def _trainer(tmp_path, *extra: str) -> Trainer:
    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)
    torch.manual_seed(0)
    overrides = [*tiny_overrides(tmp_path / "run", TINY), "recipe=afa", "afa.switch_iters=3", *extra]
    tr = Trainer(load_config(None, overrides), resume="never")
    for m in tr.net.modules():  # deterministic forwards: the transcription runs them in its own order
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
            m.p = 0.0
    return tr


def _official(tr: Trainer, net, batch: Batch, iteration: int) -> tuple[dict, dict, dict]:
    """AFA's terms, labels and gradient on ``net`` (a copy of the trainer's)."""
    cfg = tr.cfg
    crf = None
    if cfg.loss.reg:
        def crf(img255, probs, roi, label):
            return dense_energy_loss(img255, probs, roi, label, sigma_rgb=15.0, sigma_xy=100.0, scale=0.5,
                                     weight=1e-7, gain="field", backend="cpp")
    net.train()
    net.zero_grad(set_to_none=True)
    terms, labels = afa.afa_iteration(
        net, batch.img, batch.cls_label, batch.img_box, iteration - 1, scales=cfg.pseudo.cam_scales,
        high_thre=cfg.pseudo.bkg_high, low_thre=cfg.pseudo.bkg_low, radius=cfg.loss.aff_radius,
        num_iter=cfg.pseudo.refine_iters, switch_iters=cfg.recipe_cfg.switch_iters,
        switch_aff_label=cfg.recipe_cfg.switch_aff_label, reg=cfg.loss.reg, crf=crf)
    terms["total"].backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in net.named_parameters()}
    return {k: v.detach().item() for k, v in terms.items()}, labels, grads


def _ours(tr: Trainer, batch: dict, iteration: int) -> tuple[dict, dict, dict]:
    """The trainer's terms and gradient at ``iteration`` (the optimizer step is replaced by a capture: the weights
    stay), and the recipe's labels of the same batch."""
    grads = {}
    tr.optimizer.step = lambda *a, **k: grads.update({n: p.grad.clone() for n, p in tr.net.named_parameters()})
    tr.iteration = iteration
    values = tr.train_step(batch)
    with torch.no_grad():
        labels = tr.recipe.labels(tr._micro_batches(batch)[0], iteration)
    return values, labels, grads


@pytest.mark.parametrize("official_code", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["official_code", "fast"])
@pytest.mark.parametrize("iteration,extra", [
    (3, ()),  # post-warm-up, before the switch (n = 2 <= 3)
    (5, ()),  # after the switch (n = 4 > 3); VOC: the aff label stays the refined pseudo label
    # COCO's aff label switch (thresholds closer together: fewer uncertain pixels, so the switched label leaves
    # pairs at 1/16), and the CRF term of AFA's published log
    (5, ("afa.switch_aff_label=true", "loss.reg=0.01", "pseudo.bkg_high=0.45", "pseudo.bkg_low=0.4")),
], ids=["before_switch", "after_switch", "after_switch_coco_crf"])
def test_afa_iteration_is_the_official_one(tmp_path, official_code, iteration, extra):
    tr = _trainer(tmp_path, f"train.reference_style={str(official_code).lower()}", *extra)
    assert tr.net.affinity_head.symmetric and tr.cfg.pseudo.refine_mode == "par"
    batch = next(tr._batches())
    mb = tr._micro_batches(batch)[0]
    assert (mb.img_box[:, 1] - mb.img_box[:, 0]).min() < 64  # padded crops: the boxes are exercised
    net = copy.deepcopy(tr.net)
    want, want_labels, want_grads = _official(tr, net, mb, iteration)
    got, labels, got_grads = _ours(tr, batch, iteration)
    assert set(got) == set(want), (got, want)
    for key in ("pseudo", "seg", "aff"):
        same = (labels[key] == want_labels[key]).float().mean().item()
        assert same >= (1.0 if official_code else 0.995), f"{key} labels agree on {same:.4f} only"
    for key in ("seg", "aff"):  # labels of both kinds: no term is empty (the official mean would be NaN)
        assert (want_labels[key] == 0).any() and ((want_labels[key] > 0) & (want_labels[key] < 255)).any(), key
    if iteration > 4:  # after the switch the segmentation label is not the refined pseudo label any more
        assert not torch.equal(want_labels["seg"], want_labels["pseudo"])
    rel = 1e-5 if official_code else 1e-3
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-7), (k, got, want)
    flat_want = torch.cat([g.flatten() for g in want_grads.values()])
    flat_got = torch.cat([got_grads[n].flatten() for n in want_grads])
    err = ((flat_got - flat_want).norm() / flat_want.norm()).item()
    assert err < (1e-5 if official_code else 1e-3), err


def test_afa_recipe_with_naive_label_would_differ(tmp_path):
    """The switch test can fail: the transcription with the switch off (the plain refined label) disagrees."""
    tr = _trainer(tmp_path, "train.reference_style=true")
    batch = next(tr._batches())
    mb = tr._micro_batches(batch)[0]
    want, _, _ = _official(tr, copy.deepcopy(tr.net), mb, 5)
    got, _, _ = _official(tr, copy.deepcopy(tr.net), mb, 3)  # n = 2: before the switch
    assert abs(got["seg"] - want["seg"]) > 1e-4


def test_shipped_afa_configs():
    voc = load_config(ROOT / "configs" / "afa_voc.yaml")
    coco = load_config(ROOT / "configs" / "afa_coco.yaml")
    for cfg in (voc, coco):
        assert cfg.recipe == "afa" and cfg.model.symmetric_affinity and cfg.pseudo.refine_mode == "par"
        assert (cfg.data.crop_size, cfg.model.pooling, cfg.loss.reg, cfg.loss.scd) == (512, "gmp", 0.0, 0.0)
        assert (cfg.loss.seg, cfg.loss.aff, cfg.pseudo.bkg_high, cfg.pseudo.bkg_low) == (0.1, 0.1, 0.55, 0.35)
        assert (cfg.optim.lr, cfg.optim.warmup_iters, cfg.train.amp) == (6e-5, 1500, "off")
    assert (voc.train.max_iters, voc.train.cam_iters, voc.recipe_cfg.switch_iters, voc.pseudo.refine_iters,
            voc.data.batch_size, voc.recipe_cfg.switch_aff_label) == (20000, 2000, 6000, 10, 4, False)
    assert (coco.train.max_iters, coco.train.cam_iters, coco.recipe_cfg.switch_iters, coco.pseudo.refine_iters,
            coco.data.batch_size, coco.recipe_cfg.switch_aff_label) == (80000, 5000, 15000, 15, 8, True)


@pytest.mark.slow
def test_afa_voc_config_trains_from_the_command_line(tmp_path, capsys):
    """`tscd train --config configs/afa_voc.yaml` (on the demo data and a tiny network here): the warm-up, then
    AFA's terms before and after its label switch; the run's config.yaml is the resolved afa config."""
    from tscd.cli import main
    from tscd.eval.metrics import read_metrics
    from tscd.train.checkpoint import list_checkpoints, load_checkpoint

    run = tmp_path / "afa"
    small = ["data.dataset=demo", "data.root=null", "data.train_split=train", "data.crop_size=64", "data.demo_size=64",
             "data.demo_num_train=8", "data.demo_num_val=2", "data.batch_size=2", "data.num_workers=0",
             "model.name=tscd_mit_tiny", "model.pretrained=null", "model.decoder_dim=16", "pseudo.refine_iters=2",
             "train.cam_iters=1", "train.val_iters=0", "train.ckpt_iters=0", "train.tensorboard=false",
             "train.plots=false", "afa.switch_iters=2", "optim.warmup_iters=1"]
    assert main(["train", "--config", str(ROOT / "configs" / "afa_voc.yaml"), "--run-dir", str(run),
                 "--max-iters", "4", *small]) == 0
    assert "pseudo label (PAR)" in capsys.readouterr().out
    hist = load_checkpoint(list_checkpoints(run)[-1][1])["history"]
    assert [set(h) - {"iteration", "lr", "total"} for h in hist] == [{"cls"}] * 2 + [{"cls", "seg", "aff"}] * 2
    saved = load_config(run / "config.yaml")
    assert saved.recipe == "afa" and saved.recipe_cfg.switch_iters == 2 and saved.train.max_iters == 4
    assert [r["iteration"] for r in read_metrics(run)] == [4]
