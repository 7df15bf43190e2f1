"""Hugging Face SegFormer weights, checked against transformers' own implementation (optional test dependency).

A random ``SegformerForImageClassification`` with TSCD's strides is saved with ``save_pretrained`` and loaded through
``create_backbone(..., pretrained=...)``; the encoder must reproduce ``model.segformer(x, output_hidden_states=True)``.
"""
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from tscd.models import create_backbone, create_model  # noqa: E402
from tscd.models.weights import WeightFormatError, read_mit_weights  # noqa: E402

TSCD_STRIDES = (4, 2, 2, 1)
#: transformers' config for tscd's ``mit_tiny`` (dims (16, 32, 64, 128), depths (1, 1, 1, 2), heads (1, 1, 2, 4)).
TINY = dict(num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 2], sr_ratios=[8, 4, 2, 1],
            hidden_sizes=[16, 32, 64, 128], patch_sizes=[7, 3, 3, 3], strides=list(TSCD_STRIDES),
            num_attention_heads=[1, 1, 2, 4], mlp_ratios=[4, 4, 4, 4], num_labels=7, drop_path_rate=0.0)
#: Where SegFormer (and tscd) use LayerNorm eps 1e-6 and transformers' port its default 1e-5.
BLOCK_NORMS = re.compile(r"(layernorm_before|layernorm_after|stages\.\d+\.layer_norm)$")


def random_hf(cls_name="SegformerForImageClassification", reshape_last_stage=False):
    cfg = transformers.SegformerConfig(**TINY, reshape_last_stage=reshape_last_stage)
    cfg._attn_implementation = "eager"  # plain matmul/softmax, independent of our SDPA path
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # every tensor random (norm weights too), so any mis-mapped tensor shows
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) and BLOCK_NORMS.search(name):
            mod.eps = 1e-6  # match SegFormer's eps, so outputs agree to rounding
    return model


def hf_stages(model, img):
    """transformers' four stage outputs as (B, C, h, w) maps."""
    with torch.no_grad():
        states = getattr(model, "segformer", model)(img, output_hidden_states=True).hidden_states
    assert len(states) == 4
    out = []
    for i, s in enumerate(states):
        if s.ndim == 3:  # reshape_last_stage=False keeps the last stage as tokens (B, N, C)
            prev = out[-1]
            h, w = prev.shape[-2:]
            s = s.transpose(1, 2).reshape(s.shape[0], s.shape[2], h, w)  # stage 4 has stride 1: same grid
        out.append(s)
    return out


def ours(pretrained, name="mit_tiny"):
    return create_backbone(name, pretrained=str(pretrained), strides=TSCD_STRIDES, drop_path_rate=0.0).eval()


def max_err(expected, got):
    return max((a - b).abs().max().item() for a, b in zip(expected, got))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return random_hf()


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mit-tiny-hf")
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def img():
    return torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))


def test_save_pretrained_uses_the_hub_layout(hf_folder):
    keys = set(safetensors_torch.load_file(str(hf_folder / "model.safetensors")))
    assert "segformer.encoder.block.1.0.attention.self.key.weight" in keys
    assert "segformer.encoder.patch_embeddings.0.proj.weight" in keys
    assert {"classifier.weight", "classifier.bias"} <= keys


@pytest.mark.parametrize("where", ["folder", "safetensors", "bin"])
def test_reproduces_transformers_stage_outputs(hf_model, hf_folder, img, where, tmp_path):
    if where == "folder":
        path = hf_folder
    elif where == "safetensors":
        path = hf_folder / "model.safetensors"
    else:  # an older download: pytorch_model.bin, a torch pickle of the same hub-layout state dict
        path = tmp_path / "pytorch_model.bin"
        torch.save(safetensors_torch.load_file(str(hf_folder / "model.safetensors")), path)
    enc = ours(path)
    expected = hf_stages(hf_model, img)
    with torch.no_grad():
        got = enc(img)
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
    assert max_err(expected, got) < 2e-5
    info = read_mit_weights(path)
    assert info.format == "huggingface" and info.prefix == "segformer.encoder."
    assert sorted(info.dropped) == ["classifier.bias", "classifier.weight"]


def test_swapped_key_value_would_be_caught(hf_model, hf_folder, img, tmp_path):
    """The comparison above is sensitive to the [key | value] order: swap them in the file and it fails."""
    sd = safetensors_torch.load_file(str(hf_folder / "model.safetensors"))
    for k in [k for k in sd if ".attention.self.key." in k]:
        v = k.replace(".key.", ".value.")
        sd[k], sd[v] = sd[v], sd[k]
    path = tmp_path / "swapped.safetensors"
    safetensors_torch.save_file(sd, str(path))
    with torch.no_grad():
        got = ours(path)(img)
    assert max_err(hf_stages(hf_model, img), got) > 1e-2


def test_transformers_v5_layout_and_reshaped_last_stage(img, tmp_path):
    """``save_original_format=False`` writes transformers>=5 module names (``segformer.stages.{i}``)."""
    torch.manual_seed(2)
    model = random_hf(reshape_last_stage=True)
    model.save_pretrained(tmp_path, save_original_format=False)
    keys = set(safetensors_torch.load_file(str(tmp_path / "model.safetensors")))
    assert "segformer.stages.3.blocks.1.attention.k_proj.weight" in keys
    info = read_mit_weights(tmp_path)
    assert info.format == "huggingface" and info.prefix == "segformer."
    with torch.no_grad():
        got = ours(tmp_path)(img)
    assert max_err(hf_stages(model, img), got) < 2e-5


def test_sharded_download(hf_model, img, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    with torch.no_grad():
        got = ours(tmp_path)(img)
    assert max_err(hf_stages(hf_model, img), got) < 2e-5


def test_semantic_segmentation_checkpoint_and_create_model(img, tmp_path):
    """A fine-tuned SegformerForSemanticSegmentation: the decode head is dropped, the encoder loaded."""
    torch.manual_seed(3)
    model = random_hf("SegformerForSemanticSegmentation")
    model.save_pretrained(tmp_path)
    info = read_mit_weights(tmp_path)
    assert info.dropped and all(k.startswith("decode_head.") for k in info.dropped)
    net = create_model("tscd_mit_tiny", num_classes=3, pretrained=str(tmp_path), drop_path_rate=0.0).eval()
    with torch.no_grad():
        got = net.encoder(img)
    assert max_err(hf_stages(model, img), got) < 2e-5


def test_bare_segformer_model(img, tmp_path):
    """``SegformerModel`` alone (no head): the encoder is under ``encoder.``."""
    torch.manual_seed(4)
    model = random_hf("SegformerModel")
    model.save_pretrained(tmp_path)
    info = read_mit_weights(tmp_path)
    assert info.format == "huggingface" and info.prefix == "encoder." and info.dropped == []
    with torch.no_grad():
        got = ours(tmp_path)(img)
    assert max_err(hf_stages(model, img), got) < 2e-5


def test_errors_name_hf_keys(hf_folder, tmp_path):
    sd = safetensors_torch.load_file(str(hf_folder / "model.safetensors"))

    def save(d, name):
        safetensors_torch.save_file(d, str(tmp_path / name))
        return tmp_path / name

    no_value = {k: v for k, v in sd.items() if k != "segformer.encoder.block.1.0.attention.self.value.weight"}
    with pytest.raises(WeightFormatError, match=r"Hugging Face.*1 key\(s\) are missing: "
                                                r"\[segformer\.encoder\.block\.1\.0\.attention\.self\.value\.weight\]"):
        ours(save(no_value, "no_value.safetensors"))
    extra = {**sd, "segformer.encoder.block.0.0.attention.self.rel_pos.weight": torch.zeros(3)}
    with pytest.raises(WeightFormatError, match=r"not part of a MiT encoder.*attention\.self\.rel_pos\.weight"):
        ours(save(extra, "extra.safetensors"))
    stray = {**sd, "pooler.weight": torch.zeros(3)}
    with pytest.raises(WeightFormatError, match=r"neither the encoder nor a known head.*pooler\.weight"):
        ours(save(stray, "stray.safetensors"))
    no_norm = {k: v for k, v in sd.items() if not k.startswith("segformer.encoder.layer_norm.3.")}
    with pytest.raises(ValueError, match=r"read as Hugging Face.*missing key\(s\) \[norm4\.weight \(in the file: "
                                         r"segformer\.encoder\.layer_norm\.3\.weight\)"):
        ours(save(no_norm, "no_norm.safetensors"))
    # the tiny weights into a B0 model: shapes differ, named in both namings
    with pytest.raises(ValueError, match=r"read as Hugging Face.*shape mismatch.*patch_embed1\.proj\.weight "
                                         r"\(in the file: segformer\.encoder\.patch_embeddings\.0\.proj\.weight\): "
                                         r"expected \(32, 3, 7, 7\), got \(16, 3, 7, 7\)"):
        ours(hf_folder, name="mit_b0")


@pytest.mark.parametrize("variant,dims,depths", [("mit_b0", [32, 64, 160, 256], [2, 2, 2, 2]),
                                                 ("mit_b1", [64, 128, 320, 512], [2, 2, 2, 2]),
                                                 ("mit_b2", [64, 128, 320, 512], [3, 4, 6, 3])])
def test_variant_of_hub_sized_models(variant, dims, depths):
    """nvidia/mit-b0..b2 configs (SegFormer's dims, depths, heads): the variant is recognised from the shapes."""
    from tscd.models.weights import convert_state_dict, infer_architecture

    cfg = transformers.SegformerConfig(hidden_sizes=dims, depths=depths, num_attention_heads=[1, 2, 5, 8],
                                       num_labels=1000)
    with torch.device("meta"):  # shapes only
        model = transformers.SegformerForImageClassification(cfg)
    weights = convert_state_dict(model.state_dict())  # transformers' in-memory (v5) names
    assert infer_architecture(weights.state_dict).variant == variant
    with torch.device("meta"):
        expected = create_backbone(variant).state_dict()
    shapes = {k: tuple(v.shape) for k, v in weights.state_dict.items()}
    assert shapes == {k: tuple(v.shape) for k, v in expected.items()}
