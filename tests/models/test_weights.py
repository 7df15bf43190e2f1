"""MiT weights from mmsegmentation and SegFormer files, untrusted pickles, variant detection, `tscd weights`.

(Hugging Face weights are checked against transformers itself in ``test_weights_hf.py``.)
"""
import builtins
import os

import pytest
import torch
import torch.nn.functional as F

from tscd.cli import main
from tscd.models import MIT_CONFIGS, MixVisionTransformer, create_backbone
from tscd.models._checkpoint import UnsafeCheckpointError
from tscd.models.weights import WeightFormatError, convert_state_dict, infer_architecture, read_mit_weights

STRIDES = (4, 2, 2, 1)
TINY = {"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 2), "heads": (1, 1, 2, 4), "sr": (8, 4, 2, 1)}
PATCH_EPS, BLOCK_EPS = 1e-5, 1e-6  # SegFormer's (and tscd's) LayerNorm eps


def random_mmseg_state_dict(dims, depths, sr, seed=0) -> dict:
    """Random tensors named and shaped as mmsegmentation's MixVisionTransformer stores them (not from our model)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def t(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    prev = 3
    for i, c in enumerate(dims):
        k = 7 if i == 0 else 3
        p = f"layers.{i}."
        sd[p + "0.projection.weight"], sd[p + "0.projection.bias"] = t(c, prev, k, k), t(c)
        sd[p + "0.norm.weight"], sd[p + "0.norm.bias"] = t(c), t(c)
        for j in range(depths[i]):
            q = f"{p}1.{j}."
            sd[q + "norm1.weight"], sd[q + "norm1.bias"] = t(c), t(c)
            sd[q + "attn.attn.in_proj_weight"], sd[q + "attn.attn.in_proj_bias"] = t(3 * c, c), t(3 * c)
            sd[q + "attn.attn.out_proj.weight"], sd[q + "attn.attn.out_proj.bias"] = t(c, c), t(c)
            if sr[i] > 1:
                sd[q + "attn.sr.weight"], sd[q + "attn.sr.bias"] = t(c, c, sr[i], sr[i]), t(c)
                sd[q + "attn.norm.weight"], sd[q + "attn.norm.bias"] = t(c), t(c)
            sd[q + "norm2.weight"], sd[q + "norm2.bias"] = t(c), t(c)
            sd[q + "ffn.layers.0.weight"], sd[q + "ffn.layers.0.bias"] = t(4 * c, c, 1, 1), t(4 * c)
            sd[q + "ffn.layers.1.weight"], sd[q + "ffn.layers.1.bias"] = t(4 * c, 1, 3, 3), t(4 * c)
            sd[q + "ffn.layers.4.weight"], sd[q + "ffn.layers.4.bias"] = t(c, 4 * c, 1, 1), t(c)
        sd[p + "2.weight"], sd[p + "2.bias"] = t(c), t(c)
        prev = c
    return sd


def mmseg_reference(sd, img, heads, sr, strides):
    """mmseg's MiT forward, functionally, straight from its keys: nn.MultiheadAttention's in_proj = [q | k | v],
    1x1-conv MLP. Returns the four stage maps."""
    x, outs = img, []
    for i in range(4):
        p = f"layers.{i}."
        w = sd[p + "0.projection.weight"]
        x = F.conv2d(x, w, sd[p + "0.projection.bias"], stride=strides[i], padding=w.shape[-1] // 2)
        b, c, h, wd = x.shape
        tok = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd[p + "0.norm.weight"], sd[p + "0.norm.bias"],
                           PATCH_EPS)
        j = 0
        while f"{p}1.{j}.norm1.weight" in sd:
            q = f"{p}1.{j}."
            y = F.layer_norm(tok, (c,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], BLOCK_EPS)
            kv = y
            if sr[i] > 1:
                kv = F.conv2d(y.transpose(1, 2).reshape(b, c, h, wd), sd[q + "attn.sr.weight"], sd[q + "attn.sr.bias"],
                              stride=sr[i]).flatten(2).transpose(1, 2)
                kv = F.layer_norm(kv, (c,), sd[q + "attn.norm.weight"], sd[q + "attn.norm.bias"], PATCH_EPS)
            att, _ = F.multi_head_attention_forward(
                y.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), c, heads[i],
                sd[q + "attn.attn.in_proj_weight"], sd[q + "attn.attn.in_proj_bias"], None, None, False, 0.0,
                sd[q + "attn.attn.out_proj.weight"], sd[q + "attn.attn.out_proj.bias"], training=False,
                need_weights=False)
            tok = tok + att.transpose(0, 1)
            y = F.layer_norm(tok, (c,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], BLOCK_EPS)
            m = y.transpose(1, 2).reshape(b, c, h, wd)
            m = F.conv2d(m, sd[q + "ffn.layers.0.weight"], sd[q + "ffn.layers.0.bias"])
            m = F.conv2d(m, sd[q + "ffn.layers.1.weight"], sd[q + "ffn.layers.1.bias"], padding=1, groups=m.shape[1])
            m = F.conv2d(F.gelu(m), sd[q + "ffn.layers.4.weight"], sd[q + "ffn.layers.4.bias"])
            tok = tok + m.flatten(2).transpose(1, 2)
            j += 1
        tok = F.layer_norm(tok, (c,), sd[p + "2.weight"], sd[p + "2.bias"], BLOCK_EPS)
        x = tok.transpose(1, 2).reshape(b, c, h, wd)
        outs.append(x)
    return outs


def tiny(pretrained, name="mit_tiny"):
    return create_backbone(name, pretrained=str(pretrained), strides=STRIDES, drop_path_rate=0.0).eval()


def max_err(expected, got):
    return max((a - b).abs().max().item() for a, b in zip(expected, got))


@pytest.fixture(scope="module")
def mmseg_sd():
    return random_mmseg_state_dict(TINY["dims"], TINY["depths"], TINY["sr"])


@pytest.fixture(scope="module")
def img():
    return torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------- mmsegmentation


@pytest.mark.parametrize("wrap", ["converter", "segmentor"])
def test_mmseg_reproduces_reference(mmseg_sd, img, tmp_path, wrap):
    if wrap == "converter":  # what mmseg's mit2mmseg converter writes: the bare backbone
        obj = mmseg_sd
    else:  # a trained mmseg segmentor: backbone + heads under state_dict, with meta
        obj = {"meta": {"mmseg_version": "1.2.2", "iter": 160000},
               "state_dict": {**{f"backbone.{k}": v for k, v in mmseg_sd.items()},
                              "decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1),
                              "auxiliary_head.conv_seg.bias": torch.zeros(19)}}
    torch.save(obj, tmp_path / "mit.pth")
    info = read_mit_weights(tmp_path / "mit.pth")
    assert info.format == "mmseg" and info.prefix == ("" if wrap == "converter" else "backbone.")
    assert sorted(info.dropped) == ([] if wrap == "converter" else
                                    ["auxiliary_head.conv_seg.bias", "decode_head.conv_seg.weight"])
    with torch.no_grad():
        got = tiny(tmp_path / "mit.pth")(img)
    expected = mmseg_reference(mmseg_sd, img, TINY["heads"], TINY["sr"], STRIDES)
    assert max_err(expected, got) < 2e-5


def test_mmseg_qkv_order_matters(mmseg_sd, img, tmp_path):
    """The comparison is sensitive to the split of in_proj: stored as [k | q | v], the outputs no longer match."""
    sd = dict(mmseg_sd)
    for k in [k for k in sd if k.endswith("in_proj_weight") or k.endswith("in_proj_bias")]:
        q, kk, v = sd[k].chunk(3, dim=0)
        sd[k] = torch.cat([kk, q, v], dim=0)
    torch.save(sd, tmp_path / "swapped.pth")
    with torch.no_grad():
        got = tiny(tmp_path / "swapped.pth")(img)
    assert max_err(mmseg_reference(mmseg_sd, img, TINY["heads"], TINY["sr"], STRIDES), got) > 1e-2


def test_mmseg_errors(mmseg_sd, tmp_path):
    bad = {**mmseg_sd, "layers.1.1.0.ffn.layers.0.weight": torch.zeros(128, 32, 3, 3)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightFormatError, match=r"mmsegmentation.*wrong shape.*layers\.1\.1\.0\.ffn\.layers\.0\.weight "
                                                r"\(128, 32, 3, 3\): expected a 1x1 conv"):
        tiny(tmp_path / "bad.pth")
    bad = {**mmseg_sd, "layers.0.1.0.attn.attn.in_proj_weight": torch.zeros(40, 16)}
    torch.save(bad, tmp_path / "bad_qkv.pth")
    with pytest.raises(WeightFormatError, match=r"in_proj_weight \(40, 16\): expected \(3C, C\)"):
        tiny(tmp_path / "bad_qkv.pth")
    extra = {**mmseg_sd, "layers.0.1.0.attn.gamma": torch.zeros(16)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightFormatError,
                       match=r"mmsegmentation.*not part of a MiT encoder.*layers\.0\.1\.0\.attn\.gamma"):
        tiny(tmp_path / "extra.pth")
    missing = {k: v for k, v in mmseg_sd.items() if not k.startswith("layers.2.1.0.attn.sr.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"mmsegmentation.*missing key\(s\) \[block3\.0\.attn\.sr\.weight "
                                         r"\(in the file: layers\.2\.1\.0\.attn\.sr\.weight\)"):
        tiny(tmp_path / "missing.pth")


# ------------------------------------------------------------------------------------------------ format detection


def test_formats_are_detected_from_content_not_file_names(mmseg_sd, img, tmp_path):
    """A safetensors file named .pth and a torch pickle named .safetensors are both read for what they are."""
    from safetensors.torch import save_file

    save_file(mmseg_sd, str(tmp_path / "looks_like.pth"))
    torch.save(mmseg_sd, tmp_path / "looks_like.safetensors")
    a, b = read_mit_weights(tmp_path / "looks_like.pth"), read_mit_weights(tmp_path / "looks_like.safetensors")
    assert a.format == b.format == "mmseg"
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k


def test_segformer_format_unchanged_and_folder(tmp_path):
    torch.manual_seed(0)
    ref = MixVisionTransformer(embed_dims=TINY["dims"], depths=TINY["depths"], num_heads=TINY["heads"])
    sd = {**ref.state_dict(), "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}
    (tmp_path / "dl").mkdir()
    torch.save(sd, tmp_path / "dl" / "mit_tiny.pth")
    info = read_mit_weights(tmp_path / "dl")  # a folder with one weight file
    assert info.format == "segformer" and info.prefix == "" and info.dropped == ["head.weight", "head.bias"]
    enc = tiny(tmp_path / "dl")
    for k, v in ref.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v), k


def test_unknown_ambiguous_and_stray(tmp_path, mmseg_sd):
    with pytest.raises(WeightFormatError, match=r"not a MiT encoder checkpoint in any known format.*"
                                                r"2 key\(s\), the first: \[conv1\.weight, fc\.weight\]"):
        convert_state_dict({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(2, 8)})
    both = {**mmseg_sd, **{f"teacher.{k}": v for k, v in mmseg_sd.items()}}
    with pytest.raises(WeightFormatError, match=r"ambiguous.*under ''.*under 'teacher\.'"):
        convert_state_dict(both)
    stray = {**{f"backbone.{k}": v for k, v in mmseg_sd.items()}, "ema.step": torch.zeros(1)}
    with pytest.raises(WeightFormatError, match=r"neither the encoder nor a known head.*\[ema\.step\]"):
        convert_state_dict(stray)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"directory with no weight file.*config\.json"):
        read_mit_weights(tmp_path / "empty")


@pytest.mark.parametrize("name", [n for n in MIT_CONFIGS])
def test_variant_from_shapes(name):
    with torch.device("meta"):
        sd = MixVisionTransformer(**MIT_CONFIGS[name]).state_dict()
    arch = infer_architecture(sd)
    assert arch.variant == name
    assert arch.embed_dims == MIT_CONFIGS[name]["embed_dims"] and arch.depths == MIT_CONFIGS[name]["depths"]
    assert arch.sr_ratios == (8, 4, 2, 1)


# ------------------------------------------------------------------------------------------------ untrusted pickles


class _Payload:
    """Unpickling this runs ``exec``: it writes a marker file. A stand-in for a malicious download."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.mark.parametrize("where", ["pth", "bin_in_folder"])
def test_pickle_that_runs_code_is_refused(tmp_path, mmseg_sd, where):
    marker = tmp_path / "marker"
    obj = {**mmseg_sd, "payload": _Payload(marker)}
    if where == "pth":
        path = tmp_path / "mit_b1.pth"
        torch.save(obj, path)
        target = path
    else:
        (tmp_path / "hf").mkdir()
        path = tmp_path / "hf" / "pytorch_model.bin"
        torch.save(obj, path)
        target = tmp_path / "hf"
    # the payload is live: plain unpickling runs it (so the test below proves something)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match=r"refused: it needs arbitrary unpickling.*`exec`.*Nothing from it "
                                                    r"was executed"):
        tiny(target)
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="arbitrary unpickling"):
        read_mit_weights(target)
    assert not marker.exists()


def test_pickles_are_only_read_with_weights_only(monkeypatch, tmp_path, mmseg_sd):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save(mmseg_sd, tmp_path / "m.bin")
    tiny(tmp_path / "m.bin")
    assert calls == [True]


def test_corrupt_safetensors(tmp_path, mmseg_sd):
    from safetensors.torch import save_file

    save_file(mmseg_sd, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match=r"cut\.safetensors.*safetensors file but could not be read.*corrupt"):
        tiny(tmp_path / "cut.safetensors")


# ------------------------------------------------------------------------------------------------ tscd weights CLI


def test_cli_inspect_and_convert(tmp_path, mmseg_sd, img, capsys):
    obj = {"state_dict": {**{f"backbone.{k}": v for k, v in mmseg_sd.items()},
                          "decode_head.conv_seg.weight": torch.zeros(19, 256, 1, 1)}}
    torch.save(obj, tmp_path / "segformer_mit-tiny_mmseg.pth")
    n_params = sum(p.numel() for p in create_backbone("mit_tiny").parameters())

    assert main(["weights", "inspect", str(tmp_path / "segformer_mit-tiny_mmseg.pth")]) == 0
    out = capsys.readouterr().out
    assert "format      mmseg: mmsegmentation MiT" in out
    assert "under 'backbone.'" in out and "variant     mit_tiny" in out
    assert f"parameters  {n_params:,} " in out
    assert "decode_head.conv_seg.weight" in out

    out_path = tmp_path / "converted" / "mit_tiny.pth"
    assert main(["weights", "convert", str(tmp_path / "segformer_mit-tiny_mmseg.pth"), str(out_path)]) == 0
    out = capsys.readouterr().out
    assert "mmsegmentation MiT" in out and f"wrote {out_path}" in out
    converted = torch.load(out_path, weights_only=True)
    assert set(converted) == set(create_backbone("mit_tiny").state_dict())
    assert read_mit_weights(out_path).format == "segformer"
    with torch.no_grad():
        a, b = tiny(out_path)(img), tiny(tmp_path / "segformer_mit-tiny_mmseg.pth")(img)
    assert max_err(a, b) == 0.0

    # no silent overwrite; --force overwrites
    assert main(["weights", "convert", str(tmp_path / "segformer_mit-tiny_mmseg.pth"), str(out_path)]) == 1
    assert main(["weights", "convert", str(tmp_path / "segformer_mit-tiny_mmseg.pth"), str(out_path), "--force"]) == 0
    capsys.readouterr()

    assert main(["weights", "inspect", str(out_path), "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "segformer" and summary["variant"] == "mit_tiny"
    assert summary["parameters"] == n_params and summary["dropped"] == []


def test_cli_errors(tmp_path, mmseg_sd, capsys):
    missing = {k: v for k, v in mmseg_sd.items() if not k.startswith("layers.3.2.")}  # no stage-4 norm
    torch.save(missing, tmp_path / "broken.pth")
    assert main(["weights", "convert", str(tmp_path / "broken.pth"), str(tmp_path / "out.pth")]) == 1
    err = capsys.readouterr().err
    assert "mmsegmentation" in err and "missing key(s) [norm4.weight (in the file: layers.3.2.weight)" in err
    assert not os.path.exists(tmp_path / "out.pth")
    assert main(["weights", "inspect", str(tmp_path / "nope.pth")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_safetensors_missing_is_a_clear_error(monkeypatch, tmp_path, mmseg_sd):
    import sys

    from safetensors.torch import save_file

    save_file(mmseg_sd, str(tmp_path / "model.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(RuntimeError, match=r"needs the `safetensors` package: pip install safetensors"):
        tiny(tmp_path)
