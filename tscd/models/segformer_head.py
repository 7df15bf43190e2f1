"""SegFormer's all-MLP decode head, written from the SegFormer paper (Xie et al., NeurIPS 2021) and SPEC.md 1.

Every encoder stage is projected to ``embed_dim`` channels by a per-pixel linear layer, resized to the
stage-1 (1/4) grid bilinearly (``align_corners=False``), the four maps are concatenated (deepest first), fused
by a 1x1 conv + BatchNorm + ReLU, passed through channel dropout (``nn.Dropout2d``, p = 0.1) and a 1x1 conv
to the class logits (C + 1 with background).

Plain ``BatchNorm2d``: the trainer converts it with ``nn.SyncBatchNorm.convert_sync_batchnorm`` under DDP
only (the reference uses SyncBN always and therefore needs torch.distributed even on one GPU).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Decode.

        Args:
            feats: the encoder maps [(B, C_i, h_i, w_i)], shallowest (largest) first.

        Returns:
            logits (B, num_classes, h_1, w_1), at the resolution of ``feats[0]`` (1/4 of the image).
        """
        if len(feats) != len(self.linear_c):
            raise ValueError(f"SegFormerHead: `feats` must hold {len(self.linear_c)} maps; got {len(feats)}")
        size = feats[0].shape[-2:]
        projected = []
        for f, linear in zip(feats, self.linear_c):
            b, _, h, w = f.shape
            y = linear(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            projected.append(y)
        x = self.fuse(torch.cat(projected[::-1], dim=1))
        return self.pred(self.dropout(x))
