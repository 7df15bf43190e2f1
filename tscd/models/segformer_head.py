"""SegFormer's all-MLP decode head, written from the SegFormer paper (Xie et al., NeurIPS 2021) and docs/method.md 1.

Every encoder stage is projected to ``embed_dim`` channels by a per-pixel linear layer, resized to the
stage-1 (1/4) grid bilinearly (``align_corners=False``), the four maps are concatenated (deepest first), fused
by a 1x1 conv + BatchNorm + ReLU, passed through channel dropout (``nn.Dropout2d``, p = 0.1) and a 1x1 conv
to the class logits (C + 1 with background).

Plain ``BatchNorm2d``: the trainer converts it with ``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP
only (the reference uses SyncBN always and therefore needs torch.distributed even on one GPU).

Activation checkpointing (``grad_checkpointing = True``): the whole head runs under
:func:`checkpoint_keep_bn_stats`, which keeps only the encoder maps and recomputes the rest in the backward
pass, bit-identically (the dropout mask is replayed), without updating the BatchNorm running statistics twice.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def checkpoint_keep_bn_stats(fn: Callable[..., object], module: nn.Module, *args: Tensor) -> object:
    """``fn(*args)`` under non-reentrant activation checkpointing, safe for BatchNorm in train mode.

    A plain checkpoint runs the BatchNorm layers of ``module`` twice per step (forward, then recomputation in
    the backward pass), so their running statistics would be updated twice. Here the recomputation restores
    each BatchNorm's ``running_mean`` / ``running_var`` / ``num_batches_tracked`` afterwards: the statistics
    get exactly one update, as without checkpointing, and the outputs (batch statistics) are the same. Works
    for ``SyncBatchNorm`` too. The RNG state is replayed (``preserve_rng_state``), so dropout draws the same mask.

    Args:
        fn: the function to run (e.g. a module's un-checkpointed forward).
        module: the module whose BatchNorm layers ``fn`` uses.
        *args: tensor arguments of ``fn`` (kept for the recomputation).
    """
    bns = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    calls = 0

    def run(*a: Tensor) -> object:
        nonlocal calls
        calls += 1
        if calls == 1 or not bns:
            return fn(*a)
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
        try:  # the recomputation may stop early (checkpoint's early stop raises through here): restore anyway
            return fn(*a)
        finally:
            with torch.no_grad():
                for m, (mean, var, count) in zip(bns, saved):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


def _per_pixel(f: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A linear map of every pixel's channels: (B, C_in, h, w) -> (B, C_out, h, w) (contiguous)."""
    b, _, h, w = f.shape
    return F.linear(f.flatten(2).transpose(1, 2), weight, bias).transpose(1, 2).reshape(b, -1, h, w)


class ConvBNReLU(nn.Module):
    """1x1 conv (no bias) + BatchNorm2d + ReLU.

    Initialised as the official code's mmcv ``ConvModule``: conv weight Kaiming normal (fan_out, ReLU gain,
    std = sqrt(2 / (out_channels * k * k))); BatchNorm weight 1, bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, h, w) -> (B, C_out, h, w)."""
        return self.act(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """All-MLP decoder.

    Initialisation as the official code: the per-stage linear layers and the last conv keep PyTorch's default
    init; the fuse conv is :class:`ConvBNReLU`'s (Kaiming normal, fan_out).

    Args:
        in_channels: channels of the encoder stages, shallowest first (e.g. (64, 128, 320, 512)).
        num_classes: output classes, background included (C + 1).
        embed_dim: common channel width (256).
        dropout: ``Dropout2d`` probability before the last conv (0.1).

    Attributes:
        grad_checkpointing: activation checkpointing of the whole head (default False).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SegFormerHead: `num_classes` must be >= 1; got {num_classes}")
        self.in_channels = tuple(in_channels)
        self.linear_c = nn.ModuleList(nn.Linear(c, embed_dim) for c in self.in_channels)
        self.fuse = ConvBNReLU(len(self.in_channels) * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.pred = nn.Conv2d(embed_dim, num_classes, 1)
        self.grad_checkpointing = False

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Decode.

        Args:
            feats: the encoder maps [(B, C_i, h_i, w_i)], shallowest (largest) first.

        Returns:
            logits (B, num_classes, h_1, w_1), at the resolution of ``feats[0]`` (1/4 of the image).
        """
        if len(feats) != len(self.linear_c):
            raise ValueError(f"SegFormerHead: `feats` must hold {len(self.linear_c)} maps; got {len(feats)}")
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_keep_bn_stats(self._decode, self, *feats)
        return self._decode(*feats)

    def _decode(self, *feats: Tensor) -> Tensor:
        size = feats[0].shape[-2:]
        projected = []
        for f, linear in zip(feats, self.linear_c):
            y = _per_pixel(f, linear.weight, linear.bias)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            projected.append(y)
        x = self.fuse(torch.cat(projected[::-1], dim=1))
        return self.pred(self.dropout(x))

    @torch.no_grad()
    def track_statistics(self, feats: Sequence[Tensor]) -> None:
        """What a discarded no-grad forward changes, at a fraction of its cost: the fuse BatchNorm's running
        statistics and the RNG stream (the dropout mask), as ``forward(feats)`` would change them (train mode; in
        eval mode nothing changes and nothing runs).

        The statistics are those of the fuse conv's output. The projections, the bilinear resize and the 1x1 fuse
        conv are linear per pixel, so the fuse conv's slice of stage i is folded into stage i's projection
        (``W_i P_i``, 256 x C_i) and applied at that stage's resolution; only those 256-channel maps are resized
        (once per resolution: TSCD's stages 3 and 4 share 1/16) and summed. The ``4 * embed_dim``-channel map at
        1/4 resolution and the last conv are never formed: about 5x less decoder work in the CAM passes, the same
        statistics up to float rounding (the sums are associated differently).

        Args:
            feats: the encoder maps [(B, C_i, h_i, w_i)], shallowest (largest) first.
        """
        if len(feats) != len(self.linear_c):
            raise ValueError(f"SegFormerHead: `feats` must hold {len(self.linear_c)} maps; got {len(feats)}")
        if not self.training:
            return
        size = feats[0].shape[-2:]
        fuse = self.fuse.conv.weight.flatten(1)  # (E, 4E): input channels deepest stage first
        E, n = fuse.shape[0], len(self.linear_c)
        by_size: dict[tuple[int, int], Tensor] = {}  # stages at the same resolution are summed before resizing
        bias = 0.0
        for i, (f, linear) in enumerate(zip(feats, self.linear_c)):
            part = fuse[:, (n - 1 - i) * E:(n - i) * E]  # (E, E): this stage's slice of the fuse conv
            h, w = f.shape[-2:]
            z = _per_pixel(f, part @ linear.weight)
            bias = bias + part @ linear.bias
            by_size[(h, w)] = z if (h, w) not in by_size else by_size[(h, w)] + z
        y = by_size.pop(tuple(size)).add_(bias.view(1, E, 1, 1).to(feats[0].dtype))  # in place: no grad here
        for z in by_size.values():
            y.add_(F.interpolate(z, size=size, mode="bilinear", align_corners=False))
        self.fuse.bn(y)  # the running statistics' update, exactly BatchNorm's own
        self.dropout(y.new_zeros(y.shape[0], E, 1, 1))  # the same RNG draw as the dropout mask of (B, E, h, w)
