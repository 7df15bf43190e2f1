"""MiT encoder: shapes, strides, attention maps, SDPA vs explicit path, variants, errors."""
import math

import pytest
import torch

from tests._utils import assert_close
from tscd.models import MIT_CONFIGS, MixVisionTransformer, create_backbone
from tscd.models.mit import Attention


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module")
def b0_tscd():
    torch.manual_seed(0)
    return create_backbone("mit_b0", strides=(4, 2, 2, 1)).eval()


@pytest.mark.parametrize("size", [(65, 97), (64, 64), (33, 47)])
def test_b0_shapes_odd_sizes(b0_tscd, size):
    h, w = size
    with torch.no_grad():
        feats = b0_tscd(torch.randn(2, 3, h, w))
    dims = (32, 64, 160, 256)
    downs = (4, 8, 16, 16)
    for f, c, d in zip(feats, dims, downs):
        assert tuple(f.shape) == (2, c, _ceil_div(h, d), _ceil_div(w, d))
    assert b0_tscd.stage_sizes(h, w) == [tuple(f.shape[-2:]) for f in feats]


def test_b0_shape_321x257(b0_tscd):
    with torch.no_grad():
        x4 = b0_tscd(torch.randn(1, 3, 321, 257))[3]
    assert tuple(x4.shape) == (1, 256, 21, 17)


def test_b1_strides_respected():
    """docs/method.md 2 at crop 512 is x1 (B,64,128,128) ... x4 (B,512,32,32); same ratios at crop 128."""
    model = create_backbone("mit_b1", strides=(4, 2, 2, 1)).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 128, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 320, 8, 8), (1, 512, 8, 8)]
    assert model.stage_sizes(512, 512) == [(128, 128), (64, 64), (32, 32), (32, 32)]


def test_segformer_default_strides():
    model = MixVisionTransformer(embed_dims=(32, 64, 160, 256)).eval()
    assert model.stage_sizes(96, 64) == [(24, 16), (12, 8), (6, 4), (3, 2)]


def test_attention_map_shapes(b0_tscd):
    h, w = 65, 97
    with torch.no_grad():
        feats, attns = b0_tscd.forward_features(torch.randn(2, 3, h, w), attn_blocks="all")
    assert len(attns) == sum(b0_tscd.depths)
    k = 0
    for i in range(4):
        sh, sw = feats[i].shape[-2:]
        sr = b0_tscd.sr_ratios[i]
        n_kv = (sh // sr) * (sw // sr)
        for _ in range(b0_tscd.depths[i]):
            assert tuple(attns[k].shape) == (2, b0_tscd.num_heads[i], n_kv, n_kv)
            k += 1
    with torch.no_grad():
        _, last2 = b0_tscd.forward_features(torch.randn(1, 3, h, w), attn_blocks=[(3, -2), (3, -1)])
    assert [tuple(a.shape) for a in last2] == [(1, 8, 35, 35)] * 2


def test_attention_logits_definition():
    """Raw unscaled q.k^T, query axis average-pooled over sr x sr windows (checked with explicit loops)."""
    dim, heads, sr, h, w = 8, 2, 2, 4, 6
    attn = Attention(dim, heads, sr_ratio=sr).eval()
    x = torch.randn(1, h * w, dim)
    out, logits = attn(x, h, w, need_attn=True)
    q = attn.q(x).reshape(1, h * w, heads, dim // heads).transpose(1, 2)
    kv_in = attn.norm(attn.sr(x.transpose(1, 2).reshape(1, dim, h, w)).flatten(2).transpose(1, 2))
    k = attn.kv(kv_in)[..., :dim].reshape(1, -1, heads, dim // heads).transpose(1, 2)
    raw = q @ k.transpose(-1, -2)  # (1, heads, h*w, n_kv)
    hk, wk = h // sr, w // sr
    expected = torch.zeros(1, heads, hk * wk, hk * wk)
    for a in range(hk):
        for b in range(wk):
            rows = [(a * sr + da) * w + (b * sr + db) for da in range(sr) for db in range(sr)]
            expected[:, :, a * wk + b] = raw[:, :, rows].mean(dim=2)
    assert_close(logits, expected, rtol=1e-5, atol=1e-6, name="pooled logits")
    # and the output uses softmax(scale * logits) @ v
    v = attn.kv(kv_in)[..., dim:].reshape(1, -1, heads, dim // heads).transpose(1, 2)
    ref = ((raw * (dim // heads) ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(1, h * w, dim)
    assert_close(out, attn.proj(ref), rtol=1e-5, atol=1e-6, name="attention output")


def test_sdpa_equals_explicit_path(b0_tscd):
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        fast, none = b0_tscd.forward_features(x)
        slow, _ = b0_tscd.forward_features(x, attn_blocks="all")
    assert none == []
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert_close(a, b, rtol=1e-4, atol=1e-5, name=f"stage {i + 1}")


def test_no_attention_maps_unless_asked(b0_tscd, monkeypatch):
    """The default forward never takes the explicit path (SDPA only)."""
    calls = []
    orig = Attention._pool_queries
    monkeypatch.setattr(Attention, "_pool_queries", lambda self, *a: calls.append(1) or orig(self, *a))
    with torch.no_grad():
        b0_tscd(torch.randn(1, 3, 64, 64))
    assert calls == []


def test_norm_eps_and_drop_path():
    model = MixVisionTransformer(embed_dims=(32, 64, 160, 256))
    assert model.patch_embed1.norm.eps == 1e-5 and model.block1[0].attn.norm.eps == 1e-5
    assert model.block1[0].norm1.eps == 1e-6 and model.block4[1].norm2.eps == 1e-6 and model.norm4.eps == 1e-6
    assert model.block4[1].attn.sr is None
    blocks = [b for i in range(1, 5) for b in getattr(model, f"block{i}")]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.1)
    assert all(math.isclose(b - a, 0.1 / 7) for a, b in zip(rates, rates[1:]))
    assert isinstance(blocks[0].mlp.act, torch.nn.GELU) and blocks[0].mlp.act.approximate == "none"


def test_all_variants_sizes():
    """B0..B5 build (on the meta device: no memory, no init cost) with SegFormer's encoder sizes."""
    expected_m = {"mit_b0": 3.32, "mit_b1": 13.15, "mit_b2": 24.20, "mit_b3": 44.07, "mit_b4": 60.84,
                  "mit_b5": 81.44, "mit_tiny": 0.63}  # mit_tiny: ours, for the CPU demo
    for name, cfg in MIT_CONFIGS.items():
        with torch.device("meta"):
            model = MixVisionTransformer(**cfg)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n - expected_m[name]) < 0.01, (name, n)
        assert len(model.block3) == cfg["depths"][2]


def test_tiny_inputs_pad_the_kv_reduction(b0_tscd):
    """Maps smaller than a key/value reduction window are padded to one window: tiny inputs still run,
    and inputs that reach one full window are unchanged by the rule."""
    feats = b0_tscd(torch.randn(1, 3, 19, 23))
    assert all(torch.isfinite(f).all() for f in feats) and feats[0].shape[-2:] == (5, 6)
    x = torch.randn(1, 3, 32, 32)  # stage 1 is 8x8 = exactly one sr=8 window: no padding involved
    assert b0_tscd(x)[0].shape[-2:] == (8, 8)


def test_errors(b0_tscd):
    with pytest.raises(ValueError, match="img"):
        b0_tscd(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="at least 1x1"):
        b0_tscd(torch.randn(1, 3, 0, 16))
    with pytest.raises(ValueError, match="attn_blocks"):
        b0_tscd.forward_features(torch.randn(1, 3, 64, 64), attn_blocks="last")
    with pytest.raises(ValueError, match="attn_blocks"):
        b0_tscd.forward_features(torch.randn(1, 3, 64, 64), attn_blocks=[(3, 2)])
    with pytest.raises(ValueError, match="strides"):
        MixVisionTransformer(strides=(4, 2, 2))
    with pytest.raises(ValueError, match="name.*mit_b1"):
        create_backbone("mit_b11")


def test_backward_reaches_all_parameters():
    model = create_backbone("mit_b0", strides=(4, 2, 2, 1)).train()
    feats = model(torch.randn(1, 3, 64, 64))
    sum(f.square().mean() for f in feats).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
