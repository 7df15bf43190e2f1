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
        assert calls == {"decoder": 6, "affinity_head": 6, "forward": 6}  # 3 scales x (image, flip)
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
