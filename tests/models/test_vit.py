"""ViT encoder and ToCoNet: positional embedding, auxiliary tokens, outputs, parameter groups, weight formats, and
agreement with timm's (and transformers') ViT."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tscd.models import (
    VIT_CONFIGS,
    ToCoNet,
    ViTEncoder,
    create_toco_model,
    create_vit,
    load_vit_weights,
    param_groups,
    read_vit_weights,
    toco_param_groups,
)
from tscd.models.vit_weights import WeightFormatError

TINY = VIT_CONFIGS["vit_tiny_demo"]


def tiny_encoder(dtype=torch.float64, seed=0, **kw) -> ViTEncoder:
    torch.manual_seed(seed)
    enc = ViTEncoder(**{**TINY, **kw}).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mis-mapped tensor shows
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return enc


def tiny_net(num_classes=5, **kw) -> ToCoNet:
    torch.manual_seed(0)
    return ToCoNet(tiny_encoder(**kw), num_classes=num_classes).double().eval()


def img(h=100, w=76, b=2, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference_forward(enc: ViTEncoder, x: torch.Tensor):
    """ToCo's ViT forward written out plainly from the module's tensors: returns (cls, tokens, block outputs)."""
    p, g, d = enc.patch_size, enc.pos_grid, enc.embed_dim
    t = F.conv2d(x, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=p)
    h, w = t.shape[-2:]
    pe = enc.pos_embed[0, 1:].reshape(g, g, d).permute(2, 0, 1)[None]
    pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False).reshape(d, h * w).T[None]
    t = torch.cat([enc.cls_token.expand(x.shape[0], 1, d), t.flatten(2).transpose(1, 2)], 1)
    t = t + torch.cat([enc.pos_embed[:, :1], pe], 1)
    outs = []
    for blk in enc.blocks:
        t = blk(t)
        outs.append(t)
    t = F.layer_norm(t, (d,), enc.norm.weight, enc.norm.bias, 1e-6)
    return t[:, 0], t[:, 1:], outs


# ------------------------------------------------------------------------------------------------------------ encoder


@pytest.mark.parametrize("size", [(100, 76), (96, 96), (8, 8)])
def test_forward_matches_plain_reference(size):
    enc = tiny_encoder()
    x = img(*size)
    with torch.no_grad():
        cls, tokens, aux = enc.forward_features(x)
        rcls, rtokens, outs = reference_forward(enc, x)
    h, w = size[0] // 8, size[1] // 8
    assert tokens.shape == (2, h * w, 64) and aux.shape == (2, h * w, 64) and cls.shape == (2, 64)
    assert_close(cls, rcls, rtol=0, atol=1e-12)
    assert_close(tokens, rtokens, rtol=0, atol=1e-12)
    assert_close(aux, outs[-2][:, 1:], rtol=0, atol=1e-12)  # the tiny variant's aux_layer is -2


def test_pos_embed_at_its_own_grid_is_unchanged():
    enc = tiny_encoder()
    assert enc.pos_grid == 12
    assert torch.equal(enc.interpolate_pos_embed(12, 12)[0], enc.pos_embed[0, 1:])


def test_pos_embed_frozen_and_saved():
    net = tiny_net()
    pe = net.encoder.pos_embed
    assert isinstance(pe, torch.nn.Parameter) and not pe.requires_grad
    assert "encoder.pos_embed" in net.state_dict()
    before = pe.detach().clone()
    net.train()
    opt = torch.optim.AdamW(toco_param_groups(net, lr=1e-2), lr=1e-2)
    out = net(img())
    (out.cls_logits.sum() + out.seg_logits.sum() + out.cls_aux_logits.sum()).backward()
    assert pe.grad is None
    opt.step()
    assert torch.equal(pe, before)
    assert not torch.equal(net.encoder.cls_token.grad, torch.zeros_like(net.encoder.cls_token))


@pytest.mark.parametrize("aux_layer", [0, 1, -3, -2])
def test_aux_tokens_are_the_blocks_output(aux_layer):
    enc = tiny_encoder(aux_layer=aux_layer)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in enc.blocks]
    with torch.no_grad():
        _, tokens, aux = enc.forward_features(img())
    for h in hooks:
        h.remove()
    assert len(seen) == 4
    assert torch.equal(aux, seen[aux_layer][:, 1:])
    assert not torch.equal(aux, tokens)


def test_aux_layer_minus_one_is_the_normalised_final_tokens():
    enc = tiny_encoder(aux_layer=-1)
    with torch.no_grad():
        _, tokens, aux = enc.forward_features(img())
    assert torch.equal(aux, tokens)
    assert torch.equal(tiny_encoder(aux_layer=3).forward_features(img())[2].detach(), tokens)


def test_encoder_bad_input_and_options():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=r"4-D tensor \(B, 3, H, W\)"):
        enc.forward_features(torch.randn(3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"4-D tensor \(B, 3, H, W\)"):
        enc.forward_features(torch.randn(1, 1, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one patch"):
        enc.forward_features(torch.randn(1, 3, 7, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="aux_layer"):
        ViTEncoder(**{**TINY, "aux_layer": 4})
    with pytest.raises(ValueError, match="divisible"):
        ViTEncoder(**{**TINY, "num_heads": 3})
    with pytest.raises(ValueError, match="drop_path_rate"):
        ViTEncoder(**{**TINY, "drop_path_rate": 1.0})


def test_checkpointing_is_exact():
    x = img(48, 40, b=1)
    nets = [tiny_net(), tiny_net()]
    nets[1].set_checkpointing("all")
    grads = []
    for net in nets:
        out = net(x)
        (out.cls_logits.sum() + out.seg_logits.pow(2).sum() + out.cls_aux_logits.sum()).backward()
        grads.append([p.grad for p in net.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="mode"):
        nets[0].set_checkpointing("some")


# ------------------------------------------------------------------------------------------------------------ ToCoNet


def test_toconet_outputs():
    net = tiny_net()
    x = img()
    with torch.no_grad():
        out = net(x)
        fast = net(x, cls_only=True)
        cam = net.forward_cam(x)
        cams = net.forward_cams(x)
        cls = net.encode_cls(x)
    assert out.cls_logits.shape == (2, 5) and out.cls_aux_logits.shape == (2, 5)
    assert out.seg_logits.shape == (2, 6, 12, 9) and out.affinity is None
    assert out.cam.shape == out.cam_aux.shape == (2, 5, 12, 9)
    assert out.tokens.shape == (2, 64, 12, 9) and out.cls_token.shape == (2, 64)
    assert fast.seg_logits is None and torch.equal(fast.cam, out.cam)
    assert torch.equal(cam, out.cam)
    assert torch.equal(cams[0], out.cam) and torch.equal(cams[1], out.cam_aux)
    assert torch.equal(cls, out.cls_token)
    w = net.classifier.weight[:, :, 0, 0]
    assert_close(out.cls_logits, out.tokens.amax(dim=(2, 3)) @ w.T, rtol=0, atol=1e-12)
    assert_close(out.cam, torch.einsum("bdhw,cd->bchw", out.tokens, w), rtol=0, atol=1e-12)
    _, tokens, aux = net.encoder.forward_features(x)
    aux_map = aux.detach().transpose(1, 2).reshape(2, 64, 12, 9)
    assert_close(out.cls_aux_logits, aux_map.amax(dim=(2, 3)) @ net.aux_classifier.weight[:, :, 0, 0].T,
                 rtol=0, atol=1e-12)
    gap = ToCoNet(net.encoder, 5, pooling="gap").double()
    gap.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert_close(gap(x).cls_logits, out.tokens.mean(dim=(2, 3)) @ w.T, rtol=0, atol=1e-12)


def test_toconet_structure_and_errors():
    net = tiny_net(num_classes=3)
    dec = net.decoder
    assert [tuple(c.weight.shape) for c in (dec.conv6, dec.conv7, dec.conv8)] == [(512, 64, 3, 3), (512, 512, 3, 3),
                                                                                  (4, 512, 1, 1)]
    assert dec.conv6.dilation == (5, 5) and dec.conv6.padding == (5, 5) and dec.conv7.dilation == (5, 5)
    assert all(c.bias is None for c in (dec.conv6, dec.conv7, dec.conv8, net.classifier, net.aux_classifier))
    with pytest.raises(ValueError, match="num_classes"):
        ToCoNet(tiny_encoder(), num_classes=0)
    with pytest.raises(ValueError, match="pooling"):
        ToCoNet(tiny_encoder(), pooling="avg")


def test_param_groups():
    net = tiny_net()
    groups = toco_param_groups(net, lr=1e-4, weight_decay=0.05)
    assert [g["name"] for g in groups] == ["encoder", "heads", "decoder"]
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0, 10.0]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-3, 1e-3])
    assert all(g["weight_decay"] == 0.05 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    assert id(net.encoder.pos_embed) not in set(ids)
    assert {id(p) for p in groups[1]["params"]} == {id(net.classifier.weight), id(net.aux_classifier.weight)}
    norm_ids = {id(p) for m in net.encoder.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    assert norm_ids <= {id(p) for p in groups[0]["params"]}

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert [g["name"] for g in param_groups(Wrapper(net), 1e-4)] == ["encoder", "heads", "decoder"]
    with pytest.raises(TypeError, match="TSCDNet"):
        param_groups(torch.nn.Linear(2, 2), 1e-4)
    with pytest.raises(TypeError, match="ToCoNet"):
        toco_param_groups(torch.nn.Linear(2, 2), 1e-4)


def test_factory(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"toco_vit_base.*toco_vit_small.*toco_vit_tiny.*did you mean 'toco_vit_base'"):
        create_toco_model("toco_vit_bas", num_classes=5)
    with pytest.raises(ValueError, match="vit_tiny_demo"):
        create_vit("vit_huge")
    with caplog.at_level(logging.WARNING):
        net = create_toco_model("toco_vit_tiny", num_classes=4, decoder_dim=32)
    assert "RANDOMLY INITIALISED" in caplog.text
    assert net.encoder.aux_layer == -2 and net.decoder.conv6.out_channels == 32 and net.num_classes == 4
    torch.save({"model": net.state_dict(), "iteration": 7}, tmp_path / "toco.pth")
    again = create_toco_model("toco_vit_tiny", num_classes=4, decoder_dim=32,
                              checkpoint_path=str(tmp_path / "toco.pth"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    # a full ToCoNet checkpoint also serves as encoder weights (encoder.*; the heads are dropped)
    enc = create_vit("vit_tiny_demo", pretrained=str(tmp_path / "toco.pth"))
    assert all(torch.equal(v, enc.state_dict()[k[8:]]) for k, v in net.state_dict().items() if k.startswith("encoder."))


def test_factory_takes_the_pos_grid_from_the_weights(tmp_path):
    enc = tiny_encoder(dtype=torch.float32, pos_grid=6)
    torch.save(enc.state_dict(), tmp_path / "g6.pth")
    net = create_toco_model("toco_vit_tiny", num_classes=2, pretrained=str(tmp_path / "g6.pth"))
    assert net.encoder.pos_grid == 6 and torch.equal(net.encoder.pos_embed, enc.pos_embed)
    with pytest.raises(ValueError, match=r"6x6 token grid.*12x12.*pos_grid=6"):
        load_vit_weights(ViTEncoder(**TINY), tmp_path / "g6.pth")


# ------------------------------------------------------------------------------------------------------------ weights


def hf_layout(sd: dict, prefix: str = "vit.", v5: bool = False) -> dict:
    """Our encoder's tensors under transformers' ViT names (hub layout, or transformers >= 5's)."""
    out = {prefix + "embeddings.cls_token": sd["cls_token"], prefix + "embeddings.position_embeddings": sd["pos_embed"],
           prefix + "layernorm.weight": sd["norm.weight"], prefix + "layernorm.bias": sd["norm.bias"]}
    for p in ("weight", "bias"):
        out[f"{prefix}embeddings.patch_embeddings.projection.{p}"] = sd[f"patch_embed.proj.{p}"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, h = f"blocks.{i}.", (f"{prefix}layers.{i}." if v5 else f"{prefix}encoder.layer.{i}.")
        for p in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{p}"].chunk(3)
            if v5:
                names = {"attention.q_proj": q, "attention.k_proj": k, "attention.v_proj": v,
                         "attention.o_proj": sd[b + f"attn.proj.{p}"], "mlp.fc1": sd[b + f"mlp.fc1.{p}"],
                         "mlp.fc2": sd[b + f"mlp.fc2.{p}"]}
            else:
                names = {"attention.attention.query": q, "attention.attention.key": k,
                         "attention.attention.value": v, "attention.output.dense": sd[b + f"attn.proj.{p}"],
                         "intermediate.dense": sd[b + f"mlp.fc1.{p}"], "output.dense": sd[b + f"mlp.fc2.{p}"]}
            names.update({"layernorm_before": sd[b + f"norm1.{p}"], "layernorm_after": sd[b + f"norm2.{p}"]})
            out.update({f"{h}{n}.{p}": t.clone() for n, t in names.items()})
    return out


@pytest.fixture(scope="module")
def enc_sd():
    return {k: v.clone() for k, v in tiny_encoder(dtype=torch.float32, seed=3).state_dict().items()}


def _save(obj, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


FORMATS = {
    "deit_pth": lambda sd: ("deit.pth", {"model": {**sd, "head.weight": torch.zeros(10, 64),
                                                   "head.bias": torch.zeros(10)}}),
    "timm_safetensors": lambda sd: ("model.safetensors", {**sd, "head.weight": torch.zeros(10, 64)}),
    "timm_bin_folder": lambda sd: ("dir/pytorch_model.bin", {**sd, "head.weight": torch.zeros(10, 64)}),
    "ddp_prefix": lambda sd: ("ddp.pth", {"state_dict": {f"module.{k}": v for k, v in sd.items()}}),
    "hf_vit": lambda sd: ("hf/model.safetensors", {**hf_layout(sd), "classifier.weight": torch.zeros(10, 64),
                                                   "classifier.bias": torch.zeros(10)}),
    "hf_deit": lambda sd: ("deit_hf.bin", {**hf_layout(sd, "deit."), "classifier.weight": torch.zeros(10, 64)}),
    "hf_vitmodel": lambda sd: ("vitmodel.safetensors", {**hf_layout(sd, ""), "pooler.dense.weight": torch.zeros(64, 64),
                                                        "pooler.dense.bias": torch.zeros(64)}),
    "hf_v5": lambda sd: ("v5.safetensors", hf_layout(sd, "vit.", v5=True)),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_weight_formats_round_trip(fmt, enc_sd, tmp_path, caplog):
    name, obj = FORMATS[fmt](enc_sd)
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    _save(obj, path)
    target = path.parent if fmt in ("timm_bin_folder", "hf_vit") else path  # folders are accepted too
    enc = ViTEncoder(**TINY)
    with caplog.at_level(logging.INFO, logger="tscd.models.vit_weights"):
        weights = load_vit_weights(enc, target)
    assert weights.format == ("huggingface" if fmt.startswith("hf") else "timm")
    got = enc.state_dict()
    assert list(got) == list(enc_sd) and all(torch.equal(got[k], enc_sd[k]) for k in enc_sd)
    assert not enc.pos_embed.requires_grad
    assert ("dropped" in caplog.text) == (fmt not in ("ddp_prefix", "hf_v5"))  # heads dropped and logged


def test_weights_agree_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
                                 image_size=96, patch_size=8, layer_norm_eps=1e-6, qkv_bias=True, num_labels=3)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path)
    enc = create_vit("vit_tiny_demo", pretrained=str(tmp_path)).eval()
    x = img(96, 96).float()
    with torch.no_grad():
        ref = hf.vit(x).last_hidden_state
        cls, tokens, _ = enc.forward_features(x)
    assert_close(cls, ref[:, 0], rtol=1e-4, atol=1e-4)
    assert_close(tokens, ref[:, 1:], rtol=1e-4, atol=1e-4)


def test_weight_errors(enc_sd, tmp_path):
    enc = ViTEncoder(**TINY)

    def load(obj, name="w.pth"):
        return load_vit_weights(enc, _save(obj, tmp_path / name))

    with pytest.raises(WeightFormatError, match="distilled DeiT checkpoints are not supported"):
        load({"model": {**enc_sd, "dist_token": torch.zeros(1, 1, 64)}})
    with pytest.raises(WeightFormatError, match="distilled.*distillation_token"):
        load({**hf_layout(enc_sd, "deit."), "deit.embeddings.distillation_token": torch.zeros(1, 1, 64)})
    missing = {k: v for k, v in enc_sd.items() if k != "blocks.1.norm1.weight"}
    with pytest.raises(ValueError, match=r"1 missing key\(s\) \[blocks\.1\.norm1\.weight \(64\)\]"):
        load(missing)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \[blocks\.4\.norm1\.weight"):
        load({**enc_sd, "blocks.4.norm1.weight": torch.ones(64)})
    with pytest.raises(ValueError, match=r"shape mismatch.*blocks\.0\.mlp\.fc1\.weight: expected \(256, 64\), got "
                                         r"\(128, 64\)"):
        load({**enc_sd, "blocks.0.mlp.fc1.weight": torch.zeros(128, 64)})
    with pytest.raises(WeightFormatError, match=r"neither the encoder nor a known head.*\[extra\.weight\]"):
        load({**{f"encoder.{k}": v for k, v in enc_sd.items()}, "extra.weight": torch.zeros(2)})
    hf = hf_layout(enc_sd)
    del hf["vit.encoder.layer.2.attention.attention.value.bias"]
    with pytest.raises(WeightFormatError, match=r"blocks\.2\.attn\.qkv\.bias needs query, key and value"):
        load(hf, "hf.safetensors")
    hf = hf_layout(enc_sd)
    hf["vit.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight \(in the file: vit\.encoder\.layer\.0\."
                                         r"intermediate\.dense\.weight\): expected \(256, 64\)"):
        load(hf, "hf2.safetensors")
    with pytest.raises(WeightFormatError, match="not a ViT encoder checkpoint"):
        load({"patch_embed1.proj.weight": torch.zeros(4, 3, 7, 7)})
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        read_vit_weights(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight file"):
        read_vit_weights(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------------------ timm


def test_keys_and_shapes_equal_timm_vit_base():
    timm = pytest.importorskip("timm")
    theirs = {k: tuple(v.shape) for k, v in timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
              .items() if not k.startswith("head.")}
    ours = {k: tuple(v.shape) for k, v in ViTEncoder(**VIT_CONFIGS["vit_base"]).state_dict().items()}
    assert ours == theirs
    small = {k: tuple(v.shape) for k, v in ViTEncoder(**VIT_CONFIGS["vit_small"]).state_dict().items()}
    assert small == {k: tuple(v.shape) for k, v in timm.create_model(
        "vit_small_patch16_224", pretrained=False).state_dict().items() if not k.startswith("head.")}


def test_output_equals_timm_vision_transformer():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    theirs = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                               dynamic_img_size=False).double().eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = ViTEncoder(patch_size=16, embed_dim=64, depth=2, num_heads=2, pos_grid=14, aux_layer=0).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = img(224, 224, b=1)
    with torch.no_grad():
        ref = theirs.forward_features(x)
        cls, tokens, _ = ours.forward_features(x)
    assert_close(cls, ref[:, 0], rtol=0, atol=1e-12)
    assert_close(tokens, ref[:, 1:], rtol=0, atol=1e-12)


def test_weights_inspect_reads_a_deit_file(tmp_path, capsys):
    """`tscd weights inspect` on a DeiT-style file (``{"model": ...}`` with a classifier head): the ViT summary;
    on a file that is neither MiT nor ViT, the MiT reader's error."""
    from tscd.cli import main

    enc = tiny_encoder(dtype=torch.float32)
    sd = {k: v for k, v in enc.state_dict().items()}
    sd.update({"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)})
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": sd}, path)
    assert main(["weights", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_demo" in out and "patch=8" in out and "12x12" in out and "embed_dim=64" in out
    torch.save({"x": torch.zeros(3)}, tmp_path / "junk.pth")
    assert main(["weights", "inspect", str(tmp_path / "junk.pth")]) == 1
    assert "MiT" in capsys.readouterr().err
