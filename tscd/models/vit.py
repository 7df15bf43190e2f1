"""ViT encoder for ToCo (Ru et al., CVPR 2023): a plain ViT whose positional embedding follows the input size and
that also returns the patch tokens of an intermediate block.

Written from the ToCo paper and the behaviour of its official backbone; the transformer blocks are timm's
(:class:`timm.models.vision_transformer.Block`, fused attention).

Architecture (dim D, ``depth`` blocks, patch p):

* ``patch_embed.proj``: a conv with kernel = stride = p; an H x W image gives a token grid of
  ``(H // p, W // p)`` (the remainder is dropped by the conv).
* ``cls_token`` (1, 1, D) and ``pos_embed`` (1, 1 + g * g, D): the positional embedding is that of a g x g
  grid (g = 14 for ImageNet 224 weights, 24 for 384 ones; read from its length), **frozen** (``requires_grad``
  False, as in ToCo) but kept in the state dict. Its patch part is reshaped to (1, D, g, g) and resized
  bicubically (``align_corners=False``, no antialias) to the token grid on every forward; the class token gets
  the first entry.
* ``blocks.{i}``: pre-norm transformer blocks (LayerNorm eps 1e-6, qkv bias, MLP ratio 4, exact GELU,
  stochastic depth rising linearly from 0 to ``drop_path_rate``); ``norm``: the final LayerNorm (eps 1e-6).

State-dict keys are those of timm's / DeiT's ``VisionTransformer`` (without its ``head``), so their ImageNet
checkpoints load directly (:mod:`tscd.models.vit_weights` also reads Hugging Face's layout).

Auxiliary tokens: ToCo's auxiliary classifier reads the patch tokens output by block ``aux_layer`` (an index
into the list of the ``depth`` block outputs, default -3), not normalised. As in ToCo, the last entry of that
list is replaced by the normalised final tokens, so ``aux_layer = -1`` returns the final (normalised) tokens.
"""
from __future__ import annotations

import difflib
import logging
import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

#: LayerNorm eps of the blocks and the final norm (timm / DeiT ViT).
VIT_NORM_EPS: float = 1e-6

#: ViT variants: patch size, dim, depth, heads and the grid of the stored positional embedding (224 / 16 = 14).
VIT_CONFIGS: dict[str, dict[str, int]] = {
    # DeiT-B and ViT-B (deit_base_patch16_224, vit_base_patch16_224): ToCo's encoders
    "vit_base": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "pos_grid": 14},
    "vit_small": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "pos_grid": 14},
    # not a released size: a tiny ViT for tests and the CPU demo on 96-px crops (no pretrained weights exist)
    "vit_tiny_demo": {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "pos_grid": 12, "aux_layer": -2},
}
#: Variants with released ImageNet weights (DeiT, timm).
VIT_RELEASED: frozenset[str] = frozenset({"vit_base", "vit_small"})


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a conv with kernel = stride = ``patch_size`` (timm's key ``proj``)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D, H // p, W // p)."""
        return self.proj(x)


class ViTEncoder(nn.Module):
    """ToCo's ViT backbone (see the module docstring).

    Args:
        patch_size: patch size p (16 for ViT-B/16).
        embed_dim: token dim D.
        depth: number of blocks.
        num_heads: attention heads (D divisible by it).
        pos_grid: g, the side of the stored positional-embedding grid (image size / p of the pretraining).
        in_chans: image channels.
        mlp_ratio: MLP hidden size relative to D.
        aux_layer: which block's patch tokens :meth:`forward_features` returns as ``aux`` (index into the
            ``depth`` block outputs, negative from the end; ToCo: -3).
        drop_path_rate: stochastic depth of the last block (linear from 0; ToCo: 0).

    Attributes:
        patch_size, embed_dim, depth, aux_layer: as given.
        grad_checkpointing: activation checkpointing of the blocks under grad (default False).

    Raises:
        ValueError: bad sizes, ``aux_layer`` out of range or ``drop_path_rate`` outside [0, 1).
    """

    def __init__(self, patch_size: int = 16, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 pos_grid: int = 14, in_chans: int = 3, mlp_ratio: float = 4.0, aux_layer: int = -3,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if min(patch_size, embed_dim, depth, num_heads, pos_grid, in_chans) < 1 or embed_dim % num_heads:
            raise ValueError(f"ViTEncoder: sizes must be positive and `embed_dim` divisible by `num_heads`; got "
                             f"patch_size={patch_size}, embed_dim={embed_dim}, depth={depth}, num_heads={num_heads}, "
                             f"pos_grid={pos_grid}, in_chans={in_chans}")
        if not -depth <= aux_layer < depth:
            raise ValueError(f"ViTEncoder: `aux_layer` must be in [{-depth}, {depth - 1}] (an index into the "
                             f"{depth} block outputs); got {aux_layer}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"ViTEncoder: `drop_path_rate` must be in [0, 1); got {drop_path_rate}")
        self.patch_size, self.embed_dim, self.depth, self.in_chans = patch_size, embed_dim, depth, in_chans
        self.aux_layer = aux_layer
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim), requires_grad=False)
        norm = partial(nn.LayerNorm, eps=VIT_NORM_EPS)
        dpr = [drop_path_rate * k / (depth - 1) if depth > 1 else 0.0 for k in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[k],
                                          norm_layer=norm) for k in range(depth))
        self.norm = norm(embed_dim)
        self.grad_checkpointing = False
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    @property
    def pos_grid(self) -> int:
        """g, the side of the stored positional-embedding grid (from ``pos_embed``'s length)."""
        return math.isqrt(self.pos_embed.shape[1] - 1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing of the blocks on or off (applies to forwards with grad enabled)."""
        self.grad_checkpointing = bool(enable)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(height // p, width // p)`` of an input of ``height x width``."""
        return height // self.patch_size, width // self.patch_size

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """The patch part of ``pos_embed`` resized bicubically to an ``h x w`` grid: (1, h * w, D)."""
        g = self.pos_grid
        grid = self.pos_embed[:, 1:].reshape(1, g, g, self.embed_dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"ViTEncoder: `x` must be a 4-D tensor (B, {self.in_chans}, H, W); got shape "
                             f"{tuple(x.shape)}")
        if x.shape[-2] < self.patch_size or x.shape[-1] < self.patch_size:
            raise ValueError(f"ViTEncoder: `x` must be at least one patch ({self.patch_size}x{self.patch_size}); "
                             f"got {tuple(x.shape[-2:])}")

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the encoder.

        Args:
            x: (B, in_chans, H, W) float, normalised image; H, W >= p.

        Returns:
            ``(cls, tokens, aux)``: the final class token (B, D); the final patch tokens (B, N, D), N = (H // p) *
            (W // p) row-major, after ``norm``; the patch tokens of block ``aux_layer`` (B, N, D), not normalised
            (the normalised final tokens where ``aux_layer`` is the last block, as in ToCo).

        Raises:
            ValueError: wrong shape or an input smaller than one patch.
        """
        self._check_input(x)
        t = self.patch_embed(x)
        h, w = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2) + self.interpolate_pos_embed(h, w)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        aux_index = self.aux_layer % self.depth
        aux = t
        for k, blk in enumerate(self.blocks):
            t = checkpoint(blk, t, use_reentrant=False) if ckpt else blk(t)
            if k == aux_index:
                aux = t
        t = self.norm(t)
        if aux_index == self.depth - 1:
            aux = t
        return t[:, 0], t[:, 1:], aux[:, 1:]

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> the final patch tokens as a map (B, D, H // p, W // p)."""
        _, tokens, _ = self.forward_features(x)
        h, w = self.grid_size(*x.shape[-2:])
        return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)


def _init_weights(m: nn.Module) -> None:
    """ToCo's / timm's random init: truncated normal (std 0.02) for linear layers, LayerNorm 1 / 0; the patch conv
    keeps PyTorch's default."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def create_vit(name: str, pretrained: str | None = None, **kwargs) -> ViTEncoder:
    """Build a ViT variant of :data:`VIT_CONFIGS`.

    Args:
        name: ``vit_base``, ``vit_small`` or ``vit_tiny_demo``.
        pretrained: local path (file or folder) of ImageNet weights (DeiT, timm or Hugging Face; see
            :mod:`tscd.models.vit_weights`); ``None`` = random init with a warning. Nothing is downloaded. Unless
            ``pos_grid`` is given, the positional-embedding grid is taken from the file (so 384 weights work).
        **kwargs: overrides of :class:`ViTEncoder` arguments (``aux_layer``, ``drop_path_rate``, ``pos_grid``...).

    Raises:
        ValueError: unknown name (the closest valid one suggested), bad arguments, weights that do not fit.
        FileNotFoundError, RuntimeError: missing or unreadable weight file.
    """
    from tscd.models.vit_weights import read_vit_weights

    if name not in VIT_CONFIGS:
        close = difflib.get_close_matches(name, list(VIT_CONFIGS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"create_vit: `name` must be one of {sorted(VIT_CONFIGS)}; got {name!r}{hint}")
    weights = read_vit_weights(pretrained) if pretrained is not None else None
    if weights is not None and "pos_grid" not in kwargs and weights.pos_grid is not None:
        kwargs["pos_grid"] = weights.pos_grid
    model = ViTEncoder(**{**VIT_CONFIGS[name], **kwargs})
    if weights is not None:
        weights.load_into(model)
    elif name in VIT_RELEASED:
        logger.warning("%s: NO PRETRAINED WEIGHTS given; the encoder is RANDOMLY INITIALISED. Fine for tests and "
                       "demos, not for real training: pass the local path of ImageNet ViT weights (DeiT's "
                       "deit_base_patch16_224 .pth, or a timm / Hugging Face download).", name)
    else:
        logger.warning("%s: the encoder is RANDOMLY INITIALISED (a test-size variant without released weights).",
                       name)
    return model
