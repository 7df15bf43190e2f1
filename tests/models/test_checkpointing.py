"""Activation checkpointing (TSCDNet.set_checkpointing): bit-identical to no checkpointing, and it saves memory."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from tscd.models import create_model
from tscd.models.segformer_head import SegFormerHead


def _net(seed: int = 0, **kwargs):
    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    # drop-path, projection dropout and attention dropout all active: the recomputation must replay their draws
    opts = dict(drop_path_rate=0.3, drop_rate=0.1, attn_drop_rate=0.1, decoder_dim=16)
    opts.update(kwargs)
    net = create_model("tscd_mit_tiny", num_classes=3, **opts).train()
    logging.getLogger("tscd.models.mit").setLevel(logging.NOTSET)
    return net


def _images(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 48, 40, generator=g)


def _step(net, img: torch.Tensor, seed: int = 5) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One training-like forward (main view + second view) and backward; returns the loss terms and grads."""
    torch.manual_seed(seed)
    out = net(img)
    view2 = F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=True)
    out2 = net(view2)
    terms = [out.cls_logits.square().mean(), out.seg_logits.sin().mean(), out.affinity.mean(), out.cam.abs().mean(),
             out2.seg_logits.cos().mean(), out2.cam.mean()]
    sum(terms).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    return [t.detach() for t in terms], grads


def _saved_bytes(net, img: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward pass of one forward."""
    params = {p.data_ptr() for p in net.parameters()}
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            total += key[1]
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(img)
    del out
    return total


@pytest.mark.parametrize("mode", ["encoder", "all"])
def test_checkpointing_is_bit_identical(mode):
    base = _net()
    ckpt = copy.deepcopy(base)
    ckpt.set_checkpointing(mode)
    assert ckpt.checkpointing == mode and base.checkpointing == "off"
    img = _images()
    losses_off, grads_off = _step(base, img)
    losses_on, grads_on = _step(ckpt, img)
    for a, b in zip(losses_off, losses_on):
        assert torch.equal(a, b)
    assert grads_off.keys() == grads_on.keys() and len(grads_off) == len(list(base.parameters()))
    for name in grads_off:
        assert torch.equal(grads_off[name], grads_on[name]), name
    # BatchNorm running statistics: updated once per forward, as without checkpointing (not again on recompute)
    for (name, a), (_, b) in zip(base.named_buffers(), ckpt.named_buffers()):
        assert torch.equal(a, b), name
    assert int(ckpt.decoder.fuse.bn.num_batches_tracked) == 2


def test_randomness_is_active_in_the_test_model():
    """The parity test above is meaningful only if drop-path/dropout draw random numbers in train mode."""
    net = _net()
    img = _images()
    torch.manual_seed(1)
    a = net(img).seg_logits
    torch.manual_seed(2)
    b = net(img).seg_logits
    assert not torch.equal(a, b)


def test_checkpointing_saves_activation_memory():
    net = _net(drop_path_rate=0.0, drop_rate=0.0, attn_drop_rate=0.0)
    img = torch.randn(2, 3, 64, 64)
    saved = {}
    for mode in ("off", "encoder", "all"):
        net.set_checkpointing(mode)
        saved[mode] = _saved_bytes(net, img)
    assert saved["encoder"] < 0.6 * saved["off"]
    assert saved["all"] < 0.8 * saved["encoder"]  # decoder + affinity head: most of what is left
    with torch.no_grad():  # no gradients: nothing to checkpoint, the plain path runs
        net.set_checkpointing("all")
        assert net(img).seg_logits.shape == (2, 4, 16, 16)


def test_checkpointed_blocks_return_attention_logits():
    net = _net()
    enc = net.encoder
    img = _images()
    results = []
    for on in (False, True):
        enc.set_grad_checkpointing(on)
        enc.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        feats, attns = enc.forward_features(img, "all")
        assert len(attns) == sum(enc.depths) and all(a is not None for a in attns)
        (sum(a.mean() for a in attns) + feats[3].mean()).backward()
        results.append(([a.detach() for a in attns], {n: p.grad.clone() for n, p in enc.named_parameters()
                                                      if p.grad is not None}))
    (attn_off, g_off), (attn_on, g_on) = results
    assert all(torch.equal(a, b) for a, b in zip(attn_off, attn_on))
    assert g_off.keys() == g_on.keys() and all(torch.equal(g_off[k], g_on[k]) for k in g_off)


def test_checkpointing_under_bf16_autocast_matches():
    base = _net()
    ckpt = copy.deepcopy(base)
    ckpt.set_checkpointing("all")
    img = _images()
    results = []
    for net in (base, ckpt):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_step(net, img))
    (l_off, g_off), (l_on, g_on) = results
    assert all(torch.equal(a, b) for a, b in zip(l_off, l_on))
    assert all(torch.equal(g_off[k], g_on[k]) for k in g_off)


def test_bad_mode_is_rejected():
    net = _net()
    with pytest.raises(ValueError, match="`mode` must be one of off, encoder, all; got 'decoder'"):
        net.set_checkpointing("decoder")


def test_decoder_checkpoint_keeps_one_bn_update():
    head = SegFormerHead((4, 8, 8, 8), 3, embed_dim=8).train()
    head.grad_checkpointing = True
    feats = [torch.randn(2, c, s, s, requires_grad=True) for c, s in ((4, 8), (8, 4), (8, 2), (8, 2))]
    before = head.fuse.bn.running_mean.clone()
    head(feats).sum().backward()
    after_one = head.fuse.bn.running_mean.clone()
    assert not torch.equal(before, after_one) and int(head.fuse.bn.num_batches_tracked) == 1
    ref = copy.deepcopy(head)
    ref.grad_checkpointing = False
    ref.fuse.bn.running_mean.copy_(before)
    ref.fuse.bn.num_batches_tracked.zero_()
    ref.fuse.bn.running_var.fill_(1.0)
    ref(feats)
    assert torch.equal(ref.fuse.bn.running_mean, after_one)
