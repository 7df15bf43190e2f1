"""Checkpoint loading and multi-scale inference."""
import pytest
import torch

from tests._utils import assert_close
from tscd.eval.inference import forward_multi_scale, load_model, resize_long
from tscd.models import multi_scale_cam

from .conftest import save_checkpoint


def test_load_model_rebuilds_the_architecture(checkpoint):
    loaded = load_model(checkpoint)
    assert loaded.num_classes == 5 and loaded.iteration == 7 and not loaded.model.training
    assert loaded.config.model.name == "tscd_mit_tiny"


def test_load_model_errors(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt, truncated"):
        load_model(bad)
    with pytest.raises(ValueError, match="decoder"):
        load_model(checkpoint, overrides=["model.decoder_dim=64"])


def test_multi_scale_cam_matches_models_fast_path(checkpoint):
    model = load_model(checkpoint).model
    x = torch.randn(2, 3, 67, 93)
    out = forward_multi_scale(model, x, seg_scales=(1.0, 0.5, 0.75), cam_scales=(1.0, 0.5, 1.5))
    assert_close(out.cam, multi_scale_cam(model, x, (1.0, 0.5, 1.5)), rtol=1e-4, atol=1e-5, name="cam")
    with torch.no_grad():
        ref = model(x)
    assert_close(out.seg_logits, ref.seg_logits, rtol=1e-4, atol=1e-5, name="seg")
    assert_close(out.affinity, ref.affinity, rtol=1e-4, atol=1e-5, name="affinity")
    assert out.seg_ms.shape == ref.seg_logits.shape == (2, 6, 17, 24)


def test_multi_scale_seg_definition(checkpoint):
    """Flip averaged, max over scales (AFA's test_msc_flip), by hand."""
    model = load_model(checkpoint).model
    x = torch.randn(1, 3, 64, 80)
    out = forward_multi_scale(model, x, seg_scales=(1.0, 0.5), cam_scales=None, flip=True)
    assert out.cam is None
    with torch.no_grad():
        s1 = model(x).seg_logits
        s1f = model(x.flip(-1)).seg_logits.flip(-1)
        x2 = torch.nn.functional.interpolate(x, size=(32, 40), mode="bilinear", align_corners=False)
        up = lambda t: torch.nn.functional.interpolate(t, size=s1.shape[-2:], mode="bilinear",  # noqa: E731
                                                       align_corners=False)
        s2 = up(model(x2).seg_logits)
        s2f = up(model(x2.flip(-1)).seg_logits).flip(-1)
    want = torch.maximum((s1 + s1f) / 2, (s2 + s2f) / 2)
    assert_close(out.seg_ms, want, rtol=1e-4, atol=1e-5, name="seg_ms")
    single = forward_multi_scale(model, x, seg_scales=(1.0,), cam_scales=None, flip=False)
    assert_close(single.seg_ms, s1, rtol=1e-4, atol=1e-5, name="single scale")


def test_resize_long():
    x = torch.zeros(1, 3, 41, 57)
    assert resize_long(x, 114).shape[-2:] == (82, 114)
    assert resize_long(x, 0) is x


def test_bare_state_dict_takes_classes_from_weights(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, num_classes=3)
    raw = torch.load(path, weights_only=True)
    torch.save(raw["model"], tmp_path / "bare.pt")
    loaded = load_model(tmp_path / "bare.pt", overrides=["model.name=tscd_mit_tiny", "model.decoder_dim=32"])
    assert loaded.num_classes == 3


def test_trainer_style_checkpoint_with_rng_state(tmp_path, checkpoint):
    """The trainer stores RNG states as tensors and plain values: such a checkpoint loads without unpickling."""
    from tscd.train.checkpoint import rng_state

    raw = torch.load(checkpoint, weights_only=True)
    raw["rng"] = rng_state()
    torch.save(raw, tmp_path / "full.pt")
    assert load_model(tmp_path / "full.pt").num_classes == 5


class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_model_refuses_a_checkpoint_that_runs_code(tmp_path):
    """`tscd eval` / `infer` read checkpoints like the weight loader: no arbitrary unpickling, ever."""
    from tscd.errors import CheckpointError

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _RunsCode(str(marker))}, path)
    torch.load(path, weights_only=False)  # the file really does run code when unpickled freely ...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="arbitrary unpickling"):
        load_model(path)
    assert not marker.exists()  # ... and tscd did not run it
