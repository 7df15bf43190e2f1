"""The shipped defaults reproduce the official iteration: global batch, accumulation, warm-up AdamW state and
length, decoder BN statistics in CAM passes, reference_style (docs/differences.md)."""
from __future__ import annotations

import logging

import pytest
import torch

from tscd.config import load_config
from tscd.train import Trainer
from tscd.train import trainer as trainer_mod

#: the gradient tests replace optimizer.step to keep the weights; the LR scheduler warns about that
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

BASE = ["data.dataset=demo", "data.train_split=train", "data.val_split=val", "data.crop_size=48",
        "data.demo_size=40", "data.batch_size=4", "data.num_workers=0", "data.demo_num_train=8",
        "data.demo_num_val=2", "model.name=tscd_mit_tiny", "model.decoder_dim=16", "model.drop_path_rate=0.0",
        "pseudo.cam_scales=[1.0, 0.5]", "pseudo.refine_iters=2", "loss.scd_samples=5", "train.max_iters=50",
        "train.cam_iters=1", "train.tensorboard=false", "train.seed=1"]


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)
    yield
    logging.getLogger("tscd.models.mit").setLevel(logging.NOTSET)


def make(tmp_path, *extra: str) -> Trainer:
    torch.manual_seed(0)
    return Trainer(load_config(None, [*BASE, f"train.run_dir={tmp_path / 'run'}", *extra]), resume="never")


def no_dropout(tr: Trainer) -> None:
    for m in tr.net.modules():
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
            m.p = 0.0


def step(tr: Trainer, batch: dict) -> dict:
    tr.iteration += 1
    return tr.train_step(batch)


def test_warmup_is_cam_iters_plus_one_iterations(tmp_path):
    """Official: cls-only while the 0-based iteration <= cam_iters, i.e. our 1-based t <= cam_iters + 1."""
    tr = make(tmp_path, "train.cam_iters=2")
    batches = tr._batches()
    keys = [set(step(tr, next(batches))) for _ in range(4)]
    assert keys[:3] == [{"cls", "total"}] * 3
    assert {"seg", "aff", "reg", "scd"} <= keys[3]


def test_adamw_state_after_warmup_is_the_official_one(tmp_path):
    """The warm-up gives the decoder and the affinity head exact-zero gradients: AdamW counts every step (moments
    stay 0) and applies weight decay, as with the official cls + 0 * seg + 0 * aff."""
    tr = make(tmp_path, "train.cam_iters=2")
    batches = tr._batches()
    watched = list(tr.net.decoder.parameters()) + list(tr.net.affinity_head.parameters())
    start = [p.detach().clone() for p in watched]
    shrink = 1.0
    for _ in range(3):  # the 3 warm-up iterations
        group = next(g for g in tr.optimizer.param_groups if g["name"] == "decoder")
        shrink *= 1 - group["lr"] * group["weight_decay"]
        step(tr, next(batches))
    for p, p0 in zip(tr.net.decoder.parameters(), start):
        st = tr.optimizer.state[p]
        assert int(st["step"]) == 3
        assert torch.count_nonzero(st["exp_avg"]) == 0 and torch.count_nonzero(st["exp_avg_sq"]) == 0
        torch.testing.assert_close(p.detach(), p0 * shrink, rtol=1e-6, atol=0)
    heads = next(g for g in tr.optimizer.param_groups if g["name"] == "heads")
    for p in tr.net.affinity_head.parameters():
        assert id(p) in {id(q) for q in heads["params"]} and int(tr.optimizer.state[p]["step"]) == 3


def _grads_after_one_step(tr: Trainer, batch: dict) -> tuple[dict, dict]:
    grads = {}

    def capture():
        for name, p in tr.net.named_parameters():
            grads[name] = None if p.grad is None else p.grad.detach().clone()

    tr.optimizer.step = capture  # keep the weights: compare gradients only
    tr.iteration = tr.cfg.train.cam_iters + 5
    return tr.train_step(batch), grads


@pytest.mark.parametrize("terms", [("loss.scd=0",), ("loss.scd=0", "loss.reg=0", "loss.seg=0")])
def test_accumulation_gradient_equals_full_batch_gradient(tmp_path, terms):
    """accum_steps=2 (micro-batches of 2) gives the gradient of the batch of 4 at once. On a model without
    BatchNorm (the decoder's BN replaced by identity) and with SCD off (its centring mean is batch-wide: the one
    term accumulation cannot reproduce, with BN statistics)."""
    full = make(tmp_path / "a", *terms)
    acc = make(tmp_path / "b", *terms, "train.accum_steps=2")
    acc.net.load_state_dict(full.net.state_dict())
    for tr in (full, acc):
        no_dropout(tr)
        tr.net.decoder.fuse.bn = torch.nn.Identity()
    batch = next(full._batches())
    seen = []
    hook = acc.net.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    v_full, g_full = _grads_after_one_step(full, batch)
    v_acc, g_acc = _grads_after_one_step(acc, batch)
    hook.remove()
    assert seen and set(seen) == {2}  # the accumulating trainer only ever ran micro-batches of 2
    assert set(v_full) == set(v_acc)
    for k in v_full:
        assert v_acc[k] == pytest.approx(v_full[k], rel=1e-4, abs=1e-7), k
    assert set(g_full) == set(g_acc)
    for name in g_full:
        torch.testing.assert_close(g_acc[name], g_full[name], rtol=2e-4, atol=1e-7, msg=name)


def test_accumulation_with_naive_scaling_would_differ(tmp_path):
    """The count-normalised terms are what the exact scaling is for: normalising seg per micro-batch (the naive
    loss / accum_steps) changes the gradient, so the test above can fail."""
    from tscd.train.losses import seg_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 6, generator=g, requires_grad=True)
    label = torch.randint(0, 3, (4, 6, 6), generator=g)
    label[:2, :4] = 0  # the halves have different numbers of background pixels
    (full,) = torch.autograd.grad(seg_loss(logits, label), logits)
    naive = sum(torch.autograd.grad(0.5 * seg_loss(logits[i:i + 2], label[i:i + 2]), logits)[0] for i in (0, 2))
    counts = ((label == 0).sum(), (label != 0).sum())
    exact = sum(torch.autograd.grad(seg_loss(logits[i:i + 2], label[i:i + 2], counts=counts), logits)[0]
                for i in (0, 2))
    torch.testing.assert_close(exact, full)
    assert (naive - full).abs().max() > 1e-3


def test_global_batch_split_and_errors(tmp_path, monkeypatch):
    tr = make(tmp_path, "train.accum_steps=2")
    assert (tr.process_batch, tr.micro_batch, tr.train_loader.batch_size) == (4, 2, 4)
    with pytest.raises(ValueError, match="accum_steps=3 must divide the per-process batch"):
        make(tmp_path, "train.accum_steps=3")
    # three processes cannot share a global batch of 4
    monkeypatch.setattr(trainer_mod, "init_distributed",
                        lambda pref: (trainer_mod.DistInfo(0, 3, 0), torch.device("cpu")))
    with pytest.raises(ValueError, match="global batch and must divide evenly across the 3 processes"):
        make(tmp_path)
    monkeypatch.setattr(trainer_mod, "init_distributed",
                        lambda pref: (trainer_mod.DistInfo(0, 2, 0), torch.device("cpu")))
    monkeypatch.setattr(trainer_mod.Trainer, "_build_model", lambda self: None)  # no process group here
    monkeypatch.setattr(trainer_mod, "build_loader", _fake_loader)
    monkeypatch.setattr(trainer_mod.Trainer, "_maybe_resume", lambda self, resume: None)
    tr2 = make(tmp_path)
    assert tr2.process_batch == 2 and tr2.train_loader.batch_size == 2


_BUILD_LOADER = trainer_mod.build_loader


def _fake_loader(dataset, batch_size, shuffle, **kw):
    kw["distributed"] = False  # the sampler a DDP run would shard; here one process
    return _BUILD_LOADER(dataset, batch_size, shuffle, **kw)


def _bn_count(tr: Trainer) -> int:
    return int(tr.net.decoder.fuse.bn.num_batches_tracked)


@pytest.mark.parametrize("cam_decoder,per_iteration", [(True, 2 + 2 * 2), (False, 2)])
def test_decoder_bn_statistics_updated_by_cam_passes(tmp_path, cam_decoder, per_iteration):
    """Default: every CAM pass (2 scales here, both views) updates the decoder's running statistics, as the
    official full-network passes; the decoder-free option only the 2 training forwards."""
    tr = make(tmp_path, f"pseudo.cam_decoder={str(cam_decoder).lower()}")
    batches = tr._batches()
    for _ in range(2):
        step(tr, next(batches))  # warm-up: one cls-only forward each, no decoder
    before = _bn_count(tr)
    mean_before = tr.net.decoder.fuse.bn.running_mean.clone()
    step(tr, next(batches))
    assert _bn_count(tr) - before == per_iteration
    assert not torch.equal(tr.net.decoder.fuse.bn.running_mean, mean_before)


def test_reference_style_forces_the_official_numerics(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        tr = make(tmp_path, "train.reference_style=true", "train.amp=bf16", "pseudo.cam_decoder=false",
                  "loss.crf_gain=exact", "data.pad_value=mean")
    assert (tr.amp, tr.cam_decoder, tr.crf_gain, tr.pad_value) == (False, True, "field", "black")
    assert "reference_style" in caplog.text
    assert tr.train_set.transform.img_pad_value.tolist() == [0.0, 0.0, 0.0]
    default = make(tmp_path / "d", "train.amp=bf16", "loss.crf_gain=exact")
    assert (default.amp, default.crf_gain, default.cam_decoder, default.pad_value) == (True, "exact", True, "black")


def test_reference_style_and_default_agree_on_one_iteration(tmp_path):
    """The fast default path and the official structure give the same loss terms and gradient on one post-warm-up
    iteration (same weights, deterministic model; the CRF loss on the host lattice vs the local one)."""
    ref = make(tmp_path / "r", "train.reference_style=true", "loss.scd=0")
    fast = make(tmp_path / "f", "loss.scd=0", "train.backend=cpp")
    fast.net.load_state_dict(ref.net.state_dict())
    for tr in (ref, fast):
        no_dropout(tr)
    batch = next(ref._batches())
    v_ref, g_ref = _grads_after_one_step(ref, batch)
    v_fast, g_fast = _grads_after_one_step(fast, batch)
    for k in v_ref:
        assert v_fast[k] == pytest.approx(v_ref[k], rel=2e-3, abs=1e-6), k
    flat_ref = torch.cat([g.flatten() for g in g_ref.values() if g is not None])
    flat_fast = torch.cat([g_fast[n].flatten() for n, g in g_ref.items() if g is not None])
    assert ((flat_fast - flat_ref).norm() / flat_ref.norm()).item() < 1e-2
    torch.testing.assert_close(fast.net.decoder.fuse.bn.running_mean, ref.net.decoder.fuse.bn.running_mean,
                               rtol=1e-4, atol=1e-6)
