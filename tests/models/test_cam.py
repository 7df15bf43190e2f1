"""Multi-scale CAM: fast path == reference path, range, and the fast path runs no decoder / affinity head."""
import pytest
import torch

from tests._utils import assert_close
from tscd.models import multi_scale_cam, multi_scale_cam_reference


@pytest.mark.parametrize("flip", [True, False])
def test_fast_equals_reference(tscd_b0, flip):
    images = torch.randn(2 if flip else 1, 3, 65, 97)
    fast = multi_scale_cam(tscd_b0, images, scales=(1.0, 0.5, 1.5), flip=flip)
    ref = multi_scale_cam_reference(tscd_b0, images, scales=(1.0, 0.5, 1.5), flip=flip)
    assert tuple(fast.shape) == (images.shape[0], 5, 65, 97)
    assert_close(fast, ref, rtol=1e-4, atol=1e-5, name="multi_scale_cam vs reference")
    assert fast.min() >= 0 and fast.max() <= 1
    assert torch.allclose(fast.amax(dim=(2, 3)), torch.ones(images.shape[0], 5), atol=1e-4)  # every map reaches ~1
    assert not fast.requires_grad


def test_definition_single_scale(tscd_b0):
    """One scale with flip, written out: max(cam, unflipped flip-cam), ReLU, min-max normalisation."""
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        cam = tscd_b0.forward_cam(images)
        cam_f = tscd_b0.forward_cam(images.flip(-1))
    up = torch.nn.functional.interpolate
    fused = torch.relu(torch.maximum(up(cam, size=(64, 80), mode="bilinear", align_corners=False),
                                     up(cam_f, size=(64, 80), mode="bilinear", align_corners=False).flip(-1)))
    fused = fused - fused.amin(dim=(2, 3), keepdim=True)
    expected = fused / (fused.amax(dim=(2, 3), keepdim=True) + 1e-5)
    assert_close(multi_scale_cam(tscd_b0, images, scales=(1.0,)), expected, rtol=1e-4, atol=1e-5, name="cam")


def test_fast_path_calls(tscd_b0):
    calls = {"decoder": 0, "affinity_head": 0, "forward": 0}

    def counter(key):
        return lambda *_: calls.__setitem__(key, calls[key] + 1)

    hooks = [tscd_b0.decoder.register_forward_hook(counter("decoder")),
             tscd_b0.affinity_head.register_forward_hook(counter("affinity_head")),
             tscd_b0.register_forward_hook(counter("forward"))]
    try:
        images = torch.randn(1, 3, 64, 64)
        multi_scale_cam(tscd_b0, images)
        assert calls == {"decoder": 0, "affinity_head": 0, "forward": 0}
        multi_scale_cam_reference(tscd_b0, images)
        # the official structure: 3 scales, each one full forward of the image and its flip concatenated
        assert calls == {"decoder": 3, "affinity_head": 3, "forward": 3}
        multi_scale_cam(tscd_b0, images, decoder=True)  # eval mode: the decoder would change nothing, skipped
        assert calls == {"decoder": 3, "affinity_head": 3, "forward": 3}
    finally:
        for h in hooks:
            h.remove()


def test_one_forward_cam_per_scale(tscd_b0, monkeypatch):
    sizes = []
    orig = type(tscd_b0).forward_cam
    monkeypatch.setattr(type(tscd_b0), "forward_cam", lambda self, x: sizes.append(tuple(x.shape)) or orig(self, x))
    multi_scale_cam(tscd_b0, torch.randn(2, 3, 65, 97), scales=(1.0, 0.5, 1.5))
    assert sizes == [(4, 3, 65, 97), (4, 3, 32, 48), (4, 3, 97, 145)]


def test_wrapped_model_and_errors(tscd_b0):
    class Wrapper(torch.nn.Module):  # stands in for DDP: the model is under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    images = torch.randn(1, 3, 64, 64)
    assert_close(multi_scale_cam(Wrapper(tscd_b0), images), multi_scale_cam(tscd_b0, images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="images"):
        multi_scale_cam(tscd_b0, torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="scales"):
        multi_scale_cam(tscd_b0, images, scales=())
    with pytest.raises(TypeError, match="must be a TSCDNet"):
        multi_scale_cam(torch.nn.Linear(2, 2), images)


def _bn_state(net):
    bn = net.decoder.fuse.bn
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


def _train_model(seed=0):
    torch.manual_seed(seed)
    from tscd.models import create_model

    net = create_model("tscd_mit_tiny", num_classes=4, decoder_dim=16, drop_path_rate=0.0)
    for m in net.modules():  # deterministic train mode: no dropout
        if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d)):
            m.p = 0.0
    return net.train()


def test_cam_passes_update_decoder_bn_as_the_official_full_forward():
    """decoder=True (the trainer's default) changes the decoder's BN running statistics exactly as the official
    full-network CAM passes (multi_scale_cam_reference in train mode): one update per scale, image + flip."""
    images = torch.randn(2, 3, 48, 64)
    fast_net, ref_net = _train_model(), _train_model()
    before = _bn_state(fast_net)
    fast = multi_scale_cam(fast_net, images, scales=(1.0, 0.5, 1.5), decoder=True)
    ref = multi_scale_cam_reference(ref_net, images, scales=(1.0, 0.5, 1.5))
    assert_close(fast, ref, rtol=1e-4, atol=1e-5, name="cams")
    (m_f, v_f, n_f), (m_r, v_r, n_r) = _bn_state(fast_net), _bn_state(ref_net)
    assert n_f == n_r == before[2] + 3
    assert not torch.allclose(m_f, before[0])
    assert_close(m_f, m_r, rtol=1e-4, atol=1e-6, name="running_mean")
    assert_close(v_f, v_r, rtol=1e-4, atol=1e-6, name="running_var")


def test_decoder_free_cam_passes_leave_bn_untouched():
    net = _train_model()
    before = _bn_state(net)
    multi_scale_cam(net, torch.randn(2, 3, 48, 64), scales=(1.0, 0.5), decoder=False)
    after = _bn_state(net)
    assert after[2] == before[2] and torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


@pytest.mark.parametrize("size", [(48, 64), (37, 53), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_track_statistics_is_the_discarded_forward(size, dtype):
    """SegFormerHead.track_statistics (the CAM passes' decoder) changes what a discarded train-mode forward changes:
    the fuse BatchNorm's running statistics (to float rounding: the fold re-associates the sums), its batch count,
    and the RNG stream (the dropout mask's draw), on odd sizes and where no stage needs resizing."""
    net = _train_model().to(dtype)
    net.decoder.fuse.bn.momentum = 0.9  # the update dominates the running statistics
    with torch.no_grad():
        feats = net.encoder.forward_features(torch.randn(3, 3, *size, dtype=dtype))[0]
    full, fold = _train_model().decoder.to(dtype), _train_model().decoder.to(dtype)
    for d in (full, fold):
        d.load_state_dict(net.decoder.state_dict())
        d.fuse.bn.momentum = 0.9
        d.dropout.p = 0.1  # _train_model turns dropout off: here its draw is the point
    torch.manual_seed(5)
    rng_start = torch.get_rng_state()
    with torch.no_grad():
        full(feats)
    rng_full = torch.get_rng_state()
    assert not torch.equal(rng_full, rng_start)
    torch.manual_seed(5)
    fold.track_statistics(feats)
    assert torch.equal(torch.get_rng_state(), rng_full), "the dropout draw must be the full forward's"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for name in ("running_mean", "running_var"):
        want, got = getattr(full.fuse.bn, name), getattr(fold.fuse.bn, name)
        assert not torch.equal(want, getattr(net.decoder.fuse.bn, name)), name
        assert_close(got, want, name=name, **tol)
    assert int(fold.fuse.bn.num_batches_tracked) == int(full.fuse.bn.num_batches_tracked) == 1


def test_track_statistics_eval_mode_and_errors():
    net = _train_model().eval()
    with torch.no_grad():
        feats = net.encoder.forward_features(torch.randn(1, 3, 32, 32))[0]
    before, rng = _bn_state(net), torch.get_rng_state()
    net.decoder.track_statistics(feats)
    after = _bn_state(net)
    assert after[2] == before[2] and torch.equal(after[0], before[0]) and torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="4 maps"):
        net.decoder.track_statistics(feats[:3])


def test_separate_flip_and_known_scale1_equal_the_fast_path(tscd_b0):
    """``separate_flip`` (two passes of B images) and ``known`` (the image's scale-1 CAM from elsewhere, here the
    network's own forward) give the fast path's CAMs in eval mode; with a wrong known map they do not."""
    torch.manual_seed(0)
    tscd_b0.eval()
    x = torch.randn(2, 3, 50, 66)
    with torch.no_grad():
        want = multi_scale_cam(tscd_b0, x, (1.0, 0.5, 1.5))
        cam1 = tscd_b0(x).cam
    assert_close(multi_scale_cam(tscd_b0, x, (1.0, 0.5, 1.5), separate_flip=True), want, rtol=1e-5, atol=1e-6)
    assert_close(multi_scale_cam(tscd_b0, x, (1.0, 0.5, 1.5), known={1.0: cam1}), want, rtol=1e-5, atol=1e-6)
    off = multi_scale_cam(tscd_b0, x, (1.0, 0.5, 1.5), known={1.0: cam1 + 1.0})
    assert (off - want).abs().max() > 1e-3


def test_bf16_cam_passes_switch(tmp_path):
    """``pseudo.cam_amp: bf16`` runs the CAM passes under bf16 autocast (CAMs close to fp32, not equal);
    ``pseudo.cam_scale1: forward`` takes the view-1 forward's CAM; the official-code mode resets both."""
    from tests._utils import tiny_overrides
    from tscd.config import load_config
    from tscd.train import Trainer

    tr = Trainer(load_config(None, [*tiny_overrides(tmp_path / "r"), "train.device=cpu", "pseudo.cam_amp=bf16",
                                    "pseudo.cam_scale1=forward", "model.drop_path_rate=0"]), resume="never")
    tr.net.eval()
    img = torch.randn(2, 3, 64, 64)
    steps = tr.recipe.steps
    got = steps.cams(img)
    tr.cfg.pseudo.cam_amp = "off"
    want = steps.cams(img)
    assert got.dtype == torch.float32 and 1e-4 < (got - want).abs().max() < 0.1
    with torch.no_grad():
        cam1 = tr.net(img).cam
    assert_close(steps.cams(img, cam1=cam1), want, rtol=1e-5, atol=1e-6)
    assert (steps.cams(img, cam1=cam1 * 0) - want).abs().max() > 1e-3  # the forward's CAM is used
    ref = Trainer(load_config(None, [*tiny_overrides(tmp_path / "s"), "train.device=cpu", "pseudo.cam_amp=bf16",
                                     "pseudo.cam_flip=separate", "pseudo.cam_scale1=forward",
                                     "train.reference_style=true"]), resume="never")
    assert (ref.cfg.pseudo.cam_amp, ref.cfg.pseudo.cam_flip, ref.cfg.pseudo.cam_scale1) == ("off", "together", "pass")
