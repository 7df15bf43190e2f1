"""Weight loading: SegFormer-format checkpoints (synthetic), our own checkpoints, and clear errors."""
import logging

import pytest
import torch

from tscd.models import create_backbone, create_model

B0 = {"dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "sr": (8, 4, 2, 1)}


def segformer_state_dict(dims, depths, sr, num_imagenet_classes=1000, random=True) -> dict:
    """A state dict in the format of SegFormer's released ``mit_b*.pth``, built from docs/method.md 2 (not from our
    model).

    ``random=False`` fills zeros (cheap; for tests that only look at keys and shapes).
    """
    sd = {}
    randn = torch.randn if random else torch.zeros

    def ln(prefix, c):
        sd[f"{prefix}.weight"] = randn(c)
        sd[f"{prefix}.bias"] = randn(c)

    def linear(prefix, cin, cout):
        sd[f"{prefix}.weight"] = randn(cout, cin)
        sd[f"{prefix}.bias"] = randn(cout)

    prev = 3
    for i in range(4):
        c = dims[i]
        k = 7 if i == 0 else 3
        sd[f"patch_embed{i + 1}.proj.weight"] = randn(c, prev, k, k)
        sd[f"patch_embed{i + 1}.proj.bias"] = randn(c)
        ln(f"patch_embed{i + 1}.norm", c)
        for j in range(depths[i]):
            p = f"block{i + 1}.{j}"
            ln(f"{p}.norm1", c)
            linear(f"{p}.attn.q", c, c)
            linear(f"{p}.attn.kv", c, 2 * c)
            linear(f"{p}.attn.proj", c, c)
            if sr[i] > 1:
                sd[f"{p}.attn.sr.weight"] = randn(c, c, sr[i], sr[i])
                sd[f"{p}.attn.sr.bias"] = randn(c)
                ln(f"{p}.attn.norm", c)
            ln(f"{p}.norm2", c)
            linear(f"{p}.mlp.fc1", c, 4 * c)
            sd[f"{p}.mlp.dwconv.dwconv.weight"] = randn(4 * c, 1, 3, 3)
            sd[f"{p}.mlp.dwconv.dwconv.bias"] = randn(4 * c)
            linear(f"{p}.mlp.fc2", 4 * c, c)
        ln(f"norm{i + 1}", c)
        prev = c
    linear("head", dims[3], num_imagenet_classes)
    return sd


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp"])
def test_load_segformer_checkpoint(tmp_path, wrap):
    sd = segformer_state_dict(B0["dims"], B0["depths"], B0["sr"], num_imagenet_classes=10)
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
           "ddp": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = tmp_path / "mit_b0.pth"
    torch.save(obj, path)
    model = create_backbone("mit_b0", pretrained=str(path))
    loaded = model.state_dict()
    assert set(loaded) == {k for k in sd if not k.startswith("head.")}
    for k, v in loaded.items():
        assert torch.equal(v, sd[k]), k


def test_tscd_model_pretrained_and_own_checkpoint(tmp_path):
    sd = segformer_state_dict(B0["dims"], B0["depths"], B0["sr"], num_imagenet_classes=10)
    torch.save(sd, tmp_path / "mit_b0.pth")
    model = create_model("tscd_mit_b0", num_classes=3, pretrained=str(tmp_path / "mit_b0.pth"))
    assert torch.equal(model.encoder.block4[1].attn.kv.weight, sd["block4.1.attn.kv.weight"])
    assert model.encoder.strides == (4, 2, 2, 1)
    # our own full checkpoint, wrapped like a training checkpoint, with DDP + compile prefixes
    full = {"model": {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, "iter": 7}
    torch.save(full, tmp_path / "tscd.pth")
    again = create_model("tscd_mit_b0", num_classes=3, checkpoint_path=str(tmp_path / "tscd.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # a full checkpoint also serves as encoder weights
    enc = create_backbone("mit_b0", pretrained=str(tmp_path / "tscd.pth"))
    assert torch.equal(enc.norm4.weight, sd["norm4.weight"])


def test_random_init_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="tscd.models.mit"):
        create_backbone("mit_b0")
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth.*does not exist"):
        create_backbone("mit_b0", pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="directory"):
        create_backbone("mit_b0", pretrained=str(tmp_path))


def test_wrong_architecture(tmp_path):
    b1 = segformer_state_dict((64, 128, 320, 512), (2, 2, 2, 2), (8, 4, 2, 1), num_imagenet_classes=10, random=False)
    torch.save(b1, tmp_path / "mit_b1.pth")
    with pytest.raises(ValueError, match=r"shape mismatch.*patch_embed1\.proj\.weight: expected \(32, 3, 7, 7\), "
                                         r"got \(64, 3, 7, 7\)"):
        create_backbone("mit_b0", pretrained=str(tmp_path / "mit_b1.pth"))
    b0 = segformer_state_dict(B0["dims"], B0["depths"], B0["sr"], num_imagenet_classes=10, random=False)
    del b0["block2.1.attn.sr.weight"]
    b0["block5.0.extra"] = torch.zeros(2, 3)
    torch.save(b0, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as info:
        create_backbone("mit_b0", pretrained=str(tmp_path / "broken.pth"))
    msg = str(info.value)
    assert "broken.pth" in msg
    assert "1 missing key(s) [block2.1.attn.sr.weight (64, 64, 4, 4)]" in msg
    assert "1 unexpected key(s) [block5.0.extra (2, 3)]" in msg
    # a deeper variant (B2) into B1: unexpected blocks are listed
    b2 = segformer_state_dict((64, 128, 320, 512), (3, 4, 6, 3), (8, 4, 2, 1), num_imagenet_classes=10, random=False)
    torch.save(b2, tmp_path / "mit_b2.pth")
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \[block1\.2\."):
        create_backbone("mit_b1", pretrained=str(tmp_path / "mit_b2.pth"))


def test_corrupt_files(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(RuntimeError, match="garbage.pth.*corrupt"):
        create_backbone("mit_b0", pretrained=str(tmp_path / "garbage.pth"))
    sd = segformer_state_dict(B0["dims"], B0["depths"], B0["sr"], num_imagenet_classes=10, random=False)
    torch.save(sd, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="truncated.pth.*corrupt"):
        create_backbone("mit_b0", pretrained=str(tmp_path / "truncated.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(RuntimeError, match="list"):
        create_backbone("mit_b0", pretrained=str(tmp_path / "list.pth"))
    torch.save({"epoch": 3}, tmp_path / "notensors.pth")
    with pytest.raises(ValueError, match="no tensors"):
        create_backbone("mit_b0", pretrained=str(tmp_path / "notensors.pth"))


def test_unwrap_skips_tensors_beside_the_wrapper():
    """Training checkpoints keep tensors (RNG states) beside "model": the state dict is still found."""
    import torch as _torch

    from tscd.models._checkpoint import unwrap_state_dict

    sd = {"encoder.w": _torch.zeros(2)}
    assert unwrap_state_dict({"model": sd, "scd_gen": _torch.zeros(3, dtype=_torch.uint8), "iteration": 3}) == sd
    assert unwrap_state_dict({"state_dict": {"model": sd}}) == sd
    assert unwrap_state_dict(sd) == sd
