"""Mix Transformer (MiT), the SegFormer encoder, with configurable stage strides and attention maps.

Written from the SegFormer paper (Xie et al., NeurIPS 2021) and docs/method.md 2; timm's ``pvt_v2.py`` served as a
style reference only. Building blocks (``DropPath``, ``trunc_normal_``) come from timm.

Architecture (per stage i = 1..4, dims C_i, heads h_i, reduction sr_i, depth d_i):

* ``patch_embed{i}``: overlapping patch embedding, a conv (7x7 stride s_1 pad 3 for stage 1, 3x3 stride s_i
  pad 1 after) followed by LayerNorm (eps 1e-5). With strides ``(4, 2, 2, 1)`` (TSCD) stage 4 is at 1/16;
  odd sizes round up: stage i has ``ceil(H / (s_1 ... s_i))`` rows.
* ``block{i}.{j}``: ``x += drop_path(attn(norm1(x)))``, ``x += drop_path(mlp(norm2(x)))`` (LayerNorm eps 1e-6).
  The attention reads keys/values from a map reduced by a conv with kernel = stride = sr_i and a LayerNorm
  (eps 1e-5); the MLP is ``fc2(GELU(dwconv3x3(fc1(x))))`` with hidden size 4 C_i and exact GELU.
* ``norm{i}``: LayerNorm (eps 1e-6) at the end of the stage; the output is reshaped to NCHW.

State-dict keys equal those of SegFormer's released ImageNet MiT checkpoints (``mit_b*.pth``); ``head.*`` of
those files (the ImageNet classifier) is dropped by :func:`checkpoint_filter_fn`, which also reads Hugging Face
and mmsegmentation MiT weights (:mod:`tscd.models.weights`).

Attention maps (docs/method.md 2): a block can return the raw, unscaled, pre-softmax logits ``q k^T`` of shape
``(B, heads, N_kv, N_kv)``: the query axis is average-pooled with an ``sr x sr`` window (so that it matches the
key grid), which is the identity where ``sr = 1`` (stage 4). They are computed only when asked; otherwise the
block uses ``F.scaled_dot_product_attention``.

Activation checkpointing: with ``grad_checkpointing = True`` every block that runs with gradients enabled is
wrapped in :func:`torch.utils.checkpoint.checkpoint` (non-reentrant): only its input is kept and its internals
are recomputed in the backward pass. Results and gradients are bit-identical to running without it; the
recomputation replays the RNG state (drop-path, dropout). Checkpointed blocks still return their attention
logits.
"""
from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tscd.models.variants import MIT_CONFIGS, SEGFORMER_RELEASED
from tscd.models.weights import convert_state_dict, read_mit_weights

logger = logging.getLogger(__name__)

#: LayerNorm eps of the patch embeddings and of the key/value reduction (docs/method.md 2).
PATCH_NORM_EPS: float = 1e-5
#: LayerNorm eps of the blocks' norm1/norm2 and of the stage norms (docs/method.md 2).
BLOCK_NORM_EPS: float = 1e-6

#: Which blocks return attention maps: ``None`` (none), ``"all"``, or ``(stage, block)`` pairs, 0-based, negative
#: indices counting from the end of the stage (e.g. ``[(3, -2), (3, -1)]``: the last two stage-4 blocks).
AttnBlocks = Union[None, str, Sequence[tuple[int, int]]]

def _tokens_to_map(x: Tensor, h: int, w: int) -> Tensor:
    """(B, h*w, C) tokens -> (B, C, h, w) map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: conv (padding ``kernel_size // 2``) then LayerNorm over channels.

    Args:
        in_chans: input channels.
        embed_dim: output channels.
        kernel_size: conv kernel (7 for stage 1, 3 after).
        stride: conv stride (the stage's down-sampling factor).
    """

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=PATCH_NORM_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        """(B, C_in, H, W) -> tokens (B, h*w, C), h, w with h = ceil(H / stride) for the kernels used here."""
        x = self.proj(x)
        h, w = x.shape[-2], x.shape[-1]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    """Multi-head self-attention with spatially reduced keys/values (SegFormer's "efficient self-attention").

    Args:
        dim: channels C (divisible by ``num_heads``).
        num_heads: heads; head_dim = C / heads and the scale is head_dim^-0.5.
        qkv_bias: bias in ``q`` and ``kv``.
        sr_ratio: key/value reduction (conv kernel = stride = sr, then LayerNorm); 1 = none.
        attn_drop: dropout on the attention probabilities (0 in MiT).
        proj_drop: dropout after the output projection (0 in MiT).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, sr_ratio: int = 1,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: `dim` must be divisible by `num_heads`; got dim={dim}, num_heads={num_heads}")
        if sr_ratio < 1:
            raise ValueError(f"Attention: `sr_ratio` must be >= 1; got {sr_ratio}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=PATCH_NORM_EPS)
        else:
            self.sr = None
            self.norm = None

    def forward(self, x: Tensor, h: int, w: int, need_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attend.

        Args:
            x: tokens (B, N, C), N = h * w, row-major over the (h, w) grid.
            h: grid rows.
            w: grid columns.
            need_attn: also return the attention logits (explicit path instead of SDPA).

        Returns:
            ``(out, attn)``: out (B, N, C); attn (B, heads, N_kv, N_kv) raw pre-softmax ``q k^T`` (unscaled) with
            the query axis average-pooled by ``sr x sr`` (so N_kv = (h // sr) * (w // sr)), or ``None``.
        """
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr is not None:
            kv_map = _tokens_to_map(x, h, w)
            if h < self.sr_ratio or w < self.sr_ratio:
                # a map smaller than one reduction window (tiny inputs, e.g. the 0.3x SCD view of a small crop)
                # is padded (replicate) to one window, so it still yields one key/value token
                kv_map = F.pad(kv_map, (0, max(0, self.sr_ratio - w), 0, max(0, self.sr_ratio - h)), mode="replicate")
            kv_in = self.sr(kv_map)
            kv_in = self.norm(kv_in.flatten(2).transpose(1, 2))
        else:
            kv_in = x
        # kv's output channels are [k | v], each split into heads as [head, head_dim] (SegFormer's layout).
        k, v = self.kv(kv_in).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        if need_attn:
            logits = q @ k.transpose(-2, -1)  # (B, heads, N, N_kv), unscaled
            probs = (logits * self.scale).softmax(dim=-1)
            out = F.dropout(probs, drop, self.training) @ v
            attn = self._pool_queries(logits, h, w)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
            attn = None
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))
        return out, attn

    def _pool_queries(self, logits: Tensor, h: int, w: int) -> Tensor:
        """(B, heads, h*w, N_kv) -> (B, heads, N_kv, N_kv): average-pool the query axis over sr x sr windows."""
        if self.sr_ratio == 1:
            return logits
        b, heads, _, n_kv = logits.shape
        pooled = F.avg_pool2d(logits.transpose(-1, -2).reshape(b, heads * n_kv, h, w), self.sr_ratio)
        return pooled.reshape(b, heads, n_kv, -1).transpose(-1, -2)


class DWConv(nn.Module):
    """Depthwise 3x3 conv (padding 1) on tokens, used inside the Mix-FFN."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h*w, C) -> (B, h*w, C)."""
        return self.dwconv(_tokens_to_map(x, h, w)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Mix-FFN: ``fc2(drop(GELU(dwconv(fc1(x)))))``, exact (erf) GELU."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        """(B, h*w, C) -> (B, h*w, C)."""
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Transformer block: pre-norm attention and Mix-FFN, each with a residual and drop-path.

    Args:
        dim: channels.
        num_heads: attention heads.
        mlp_ratio: hidden size of the Mix-FFN relative to ``dim``.
        qkv_bias: bias in q and kv.
        sr_ratio: key/value spatial reduction.
        drop: dropout after the projections (0 in MiT).
        attn_drop: dropout on attention probabilities (0 in MiT).
        drop_path: stochastic-depth probability of this block (active in train mode only).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, sr_ratio: int = 1,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, sr_ratio=sr_ratio, attn_drop=attn_drop,
                              proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, h: int, w: int, need_attn: bool = False) -> tuple[Tensor, Tensor | None]:
        """(B, h*w, C) -> ((B, h*w, C), attention logits (B, heads, N_kv, N_kv) or None)."""
        y, attn = self.attn(self.norm1(x), h, w, need_attn)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x), h, w))
        return x, attn


def _check_four(name: str, value: Sequence, kind: type = int) -> tuple:
    if len(value) != 4 or not all(isinstance(v, kind) and v > 0 for v in value):
        raise ValueError(f"MixVisionTransformer: `{name}` must be 4 positive {kind.__name__}s (one per stage); "
                         f"got {value!r}")
    return tuple(value)


class MixVisionTransformer(nn.Module):
    """MiT encoder: four stages of overlapping patch embedding, transformer blocks and a LayerNorm.

    Args:
        in_chans: image channels.
        embed_dims: channels per stage.
        num_heads: attention heads per stage.
        mlp_ratios: Mix-FFN hidden-size ratio per stage.
        depths: blocks per stage.
        sr_ratios: key/value reduction per stage.
        strides: down-sampling of each stage's patch embedding; SegFormer (4, 2, 2, 2), TSCD (4, 2, 2, 1).
        qkv_bias: bias in q and kv.
        drop_rate: dropout after projections (0 in MiT).
        attn_drop_rate: dropout on attention probabilities (0 in MiT).
        drop_path_rate: stochastic depth rising linearly from 0 (first block) to this value (last block).

    Attributes:
        grad_checkpointing: activation checkpointing of the blocks (default False; see the module docstring).

    Stage i outputs (B, embed_dims[i], ceil(H / (strides[0] ... strides[i])), ...). For crop 512 and TSCD's
    strides with B1: (B,64,128,128), (B,128,64,64), (B,320,32,32), (B,512,32,32).
    """

    def __init__(self, in_chans: int = 3, embed_dims: Sequence[int] = (64, 128, 320, 512),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 depths: Sequence[int] = (2, 2, 2, 2), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 strides: Sequence[int] = (4, 2, 2, 2), qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.embed_dims = _check_four("embed_dims", embed_dims)
        self.num_heads = _check_four("num_heads", num_heads)
        self.depths = _check_four("depths", depths)
        self.sr_ratios = _check_four("sr_ratios", sr_ratios)
        self.strides = _check_four("strides", strides)
        self.mlp_ratios = _check_four("mlp_ratios", tuple(float(r) for r in mlp_ratios), float)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"MixVisionTransformer: `drop_path_rate` must be in [0, 1); got {drop_path_rate}")
        self.in_chans = in_chans
        self.kernel_sizes = (7, 3, 3, 3)
        total = sum(self.depths)
        dpr = [drop_path_rate * k / (total - 1) if total > 1 else 0.0 for k in range(total)]  # linear 0 -> rate
        cur = 0
        prev = in_chans
        for i in range(4):
            dim = self.embed_dims[i]
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(prev, dim, self.kernel_sizes[i], self.strides[i]))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                Block(dim, self.num_heads[i], self.mlp_ratios[i], qkv_bias, self.sr_ratios[i], drop_rate,
                      attn_drop_rate, dpr[cur + j]) for j in range(self.depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dim, eps=BLOCK_NORM_EPS))
            cur += self.depths[i]
            prev = dim
        self.grad_checkpointing = False
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the transformer blocks on or off."""
        self.grad_checkpointing = bool(enable)

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """(rows, cols) of each stage's output for an input of ``height x width``."""
        sizes = []
        for k, s in zip(self.kernel_sizes, self.strides):
            p = k // 2
            height = (height + 2 * p - k) // s + 1
            width = (width + 2 * p - k) // s + 1
            sizes.append((height, width))
        return sizes

    def _resolve_attn_blocks(self, attn_blocks: AttnBlocks) -> tuple[tuple[int, int], ...]:
        if attn_blocks is None:
            return ()
        if isinstance(attn_blocks, str):
            if attn_blocks != "all":
                raise ValueError(f"MixVisionTransformer: `attn_blocks` must be None, 'all' or (stage, block) pairs; "
                                 f"got {attn_blocks!r}")
            return tuple((i, j) for i in range(4) for j in range(self.depths[i]))
        out = []
        for pair in attn_blocks:
            if len(pair) != 2:
                raise ValueError(f"MixVisionTransformer: `attn_blocks` entries must be (stage, block); got {pair!r}")
            i, j = pair
            if not -4 <= i < 4 or not -self.depths[i] <= j < self.depths[i]:
                raise ValueError(f"MixVisionTransformer: `attn_blocks` entry {pair!r} is out of range for depths "
                                 f"{self.depths}")
            out.append((i % 4, j % self.depths[i % 4]))
        return tuple(sorted(set(out)))

    def _check_input(self, img: Tensor) -> None:
        if img.ndim != 4 or img.shape[1] != self.in_chans:
            raise ValueError(f"MixVisionTransformer: `img` must be a 4-D tensor (B, {self.in_chans}, H, W); "
                             f"got shape {tuple(img.shape)}")
        if img.shape[-2] < 1 or img.shape[-1] < 1:
            raise ValueError(f"MixVisionTransformer: `img` must be at least 1x1; got {tuple(img.shape[-2:])}")

    def forward_features(self, img: Tensor, attn_blocks: AttnBlocks = None) -> tuple[list[Tensor], list[Tensor]]:
        """Run the four stages.

        Args:
            img: (B, in_chans, H, W) float, normalised image.
            attn_blocks: blocks whose attention logits to return (see :data:`AttnBlocks`); the others use SDPA.

        Returns:
            ``(features, attns)``: features, 4 maps (B, C_i, h_i, w_i); attns, one (B, heads_i, N_kv, N_kv) per
            requested block in network order (empty when none is requested).

        Raises:
            ValueError: wrong input shape, input too small for the key/value reduction, bad ``attn_blocks``.
        """
        self._check_input(img)
        want = self._resolve_attn_blocks(attn_blocks)
        feats: list[Tensor] = []
        attns: list[Tensor] = []
        x = img
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for i in range(4):
            tokens, h, w = getattr(self, f"patch_embed{i + 1}")(x)
            for j, blk in enumerate(getattr(self, f"block{i + 1}")):
                need = (i, j) in want
                if ckpt:  # keeps the block's input only; preserve_rng_state replays drop-path / dropout
                    tokens, attn = checkpoint(blk, tokens, h, w, need, use_reentrant=False, preserve_rng_state=True)
                else:
                    tokens, attn = blk(tokens, h, w, need)
                if need:
                    attns.append(attn)
            x = _tokens_to_map(getattr(self, f"norm{i + 1}")(tokens), h, w)
            feats.append(x)
        return feats, attns

    def forward(self, img: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> the 4 stage maps [(B, C_i, h_i, w_i)]; no attention maps (SDPA everywhere)."""
        return self.forward_features(img)[0]


def _init_weights(m: nn.Module) -> None:
    """Random init: truncated normal (std 0.02) for linear layers, He-normal (fan-out) for convs."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def checkpoint_filter_fn(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a checkpoint's contents onto :class:`MixVisionTransformer` keys, whatever its format.

    Accepts the formats of :mod:`tscd.models.weights`, recognised from keys and shapes: SegFormer's ImageNet MiT
    checkpoints (``mit_b*.pth``) and our own (a bare encoder, or a full :class:`~tscd.models.tscd_net.TSCDNet`
    whose ``encoder.*`` keys are taken), Hugging Face transformers' SegFormer (``segformer.encoder.*``; key and
    value projections are concatenated into ``kv``) and mmsegmentation's MiT (``layers.{i}.{0,1,2}``, bare or under
    ``backbone.``). Wrappers (``state_dict``/``model``) and ``module.``/``_orig_mod.`` prefixes are removed; the
    ImageNet classifier and segmentation heads are dropped.

    Raises:
        ValueError: unknown format, or keys that are not part of an encoder in the format found.
    """
    return convert_state_dict(state_dict).state_dict


def load_pretrained(model: MixVisionTransformer, path: str) -> None:
    """Load encoder weights from a local file or folder in any format of :mod:`tscd.models.weights`, strictly.

    Raises:
        FileNotFoundError: ``path`` does not exist, or a folder holds no weight file.
        RuntimeError: the file cannot be read (corrupt, truncated, not a checkpoint), or it is a pickle that needs
            arbitrary unpickling (refused; nothing in it is run).
        ValueError: unknown format, or the weights do not fit the architecture (lists missing / unexpected /
            mis-shaped keys and the format recognised).
    """
    weights = read_mit_weights(path)
    try:
        weights.load_into(model, what=f"MiT encoder ({_describe(model)})")
    except ValueError as e:
        raise ValueError(f"{weights.source!r}: {e}") from None
    logger.info("loaded MiT encoder weights from %s: %s", weights.source, weights.describe())


def _describe(model: MixVisionTransformer) -> str:
    return f"embed_dims={list(model.embed_dims)}, depths={list(model.depths)}"


def create_backbone(name: str, pretrained: str | None = None, **kwargs) -> MixVisionTransformer:
    """Build a MiT variant (``mit_b0`` .. ``mit_b5``).

    Args:
        name: variant name.
        pretrained: local path of encoder weights: SegFormer's ``mit_b*.pth``, a Hugging Face download
            (``model.safetensors``, ``pytorch_model.bin`` or their folder), an mmsegmentation MiT checkpoint, or
            ours (see :mod:`tscd.models.weights`); ``None`` = random init with a warning. Nothing is downloaded.
        **kwargs: overrides of :class:`MixVisionTransformer` arguments (e.g. ``strides=(4, 2, 2, 1)``).

    Raises:
        ValueError: unknown name (the closest valid one is suggested) or bad arguments.
    """
    if name not in MIT_CONFIGS:
        close = difflib.get_close_matches(name, list(MIT_CONFIGS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"create_backbone: `name` must be one of {sorted(MIT_CONFIGS)}; got {name!r}{hint}")
    cfg = {**MIT_CONFIGS[name], **kwargs}
    model = MixVisionTransformer(**cfg)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    elif name in SEGFORMER_RELEASED:
        logger.warning("%s: NO PRETRAINED WEIGHTS given; the encoder is RANDOMLY INITIALISED. Fine for tests and "
                       "demos, not for real training: pass the local path of ImageNet MiT weights (SegFormer's %s.pth, "
                       "or a Hugging Face / mmsegmentation download; see the README).", name, name)
    else:  # a test-size variant: no released weights exist for it
        logger.warning("%s: the encoder is RANDOMLY INITIALISED (a test-size variant without released weights; "
                       "use mit_b0 .. mit_b5 with SegFormer's ImageNet weights for real training).", name)
    return model
