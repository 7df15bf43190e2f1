"""The TSCD network (docs/method.md 1-2): MiT encoder, GMP classifier / CAM, SegFormer decoder, attention affinity head.

Entry points, each explicit about what it runs:

* :meth:`TSCDNet.forward` (training): encoder (with the attention logits of the last two stage-4 blocks),
  classifier, decoder and affinity head -> :class:`TSCDOutput`. ``cls_only=True`` skips decoder and affinity
  head (for the first ``cam_iters`` iterations, where the loss is classification only).
* :meth:`TSCDNet.forward_cam` (pseudo labels): encoder (no attention maps) + the classifier's 1x1 conv on the
  stage-4 map; never the decoder or the affinity head (the reference runs both and discards them).

Both use the module's current mode. The CAM path has no BatchNorm or dropout, only LayerNorm and drop-path:
in train mode drop-path is active in CAM passes too, as in the reference, which runs its no-grad CAM passes
with the model in train mode.

Activation checkpointing (:meth:`TSCDNet.set_checkpointing`, ``train.checkpointing``): ``"encoder"``
checkpoints the MiT blocks, ``"all"`` also the decoder and the affinity head. It applies to every forward
with gradients (the main view and the second, SCD/ER, view alike) and is skipped under ``no_grad`` (CAM
passes). Outputs and gradients are bit-identical to ``"off"``; the backward pass recomputes the forward
of the checkpointed parts (about one extra encoder forward per iteration).
"""
from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tscd.models._checkpoint import load_weights, strip_prefixes, unwrap_state_dict
from tscd.models.mit import MixVisionTransformer
from tscd.models.segformer_head import SegFormerHead

logger = logging.getLogger(__name__)

#: Activation-checkpointing modes of :meth:`TSCDNet.set_checkpointing` (``train.checkpointing``).
CHECKPOINTING_MODES: tuple[str, ...] = ("off", "encoder", "all")
#: Pooling of the classifier (``model.pooling``): global max (TSCD, AFA) or average pooling.
POOLING_MODES: tuple[str, ...] = ("gmp", "gap")

#: Learning-rate multipliers of the parameter groups (docs/method.md 2).
LR_MULT: dict[str, float] = {"encoder": 1.0, "encoder_norm": 0.0, "heads": 10.0, "decoder": 10.0}


class TSCDOutput(NamedTuple):
    """Outputs of :meth:`TSCDNet.forward` for an image batch (B, 3, H, W); h16 = ceil(H / 16), N = h16 * w16.

    Attributes:
        cls_logits: (B, C) classification logits (GMP or GAP of stage 4, then the classifier).
        seg_logits: (B, C + 1, ceil(H / 4), ceil(W / 4)) segmentation logits, or ``None`` with ``cls_only``.
        affinity: (B, N, N) predicted pairwise affinity in (0, 1), or ``None`` with ``cls_only``.
        cam: (B, C, h16, w16) raw class activation map (classifier conv on stage 4, before ReLU), with grad.
    """

    cls_logits: Tensor
    seg_logits: Tensor | None
    affinity: Tensor | None
    cam: Tensor


class AffinityHead(nn.Module):
    """Attention logits -> pairwise affinity: concat maps, optional ``A + A^T``, 1x1 conv to 1, sigmoid.

    Args:
        in_maps: number of attention maps (blocks x heads; 2 x 8 = 16 for MiT stage 4).
        symmetric: AFA's variant, symmetrise (``A + A^T``) before the conv; TSCD does not (default).
    """

    def __init__(self, in_maps: int = 16, symmetric: bool = False) -> None:
        super().__init__()
        self.symmetric = symmetric
        self.proj = nn.Conv2d(in_maps, 1, 1, bias=True)
        # as the official code: weight Kaiming normal (a = sqrt(5), fan_out); bias keeps PyTorch's default init
        nn.init.kaiming_normal_(self.proj.weight, a=5 ** 0.5, mode="fan_out")

    def forward(self, attns: list[Tensor]) -> Tensor:
        """[(B, heads, N, N)] -> (B, N, N) affinity in (0, 1)."""
        a = torch.cat(attns, dim=1)
        if a.shape[1] != self.proj.in_channels:
            raise ValueError(f"AffinityHead: expected {self.proj.in_channels} attention maps in total; "
                             f"got {a.shape[1]}")
        if self.symmetric:
            a = a + a.transpose(-1, -2)
        return torch.sigmoid(self.proj(a))[:, 0]


class TSCDNet(nn.Module):
    """TSCD's single network: CAMs, segmentation and affinity from one MiT encoder.

    Args:
        encoder: a :class:`MixVisionTransformer` (TSCD: MiT-B1 with strides (4, 2, 2, 1)).
        num_classes: foreground classes C (VOC 20, COCO 80); the decoder predicts C + 1.
        pooling: ``"gmp"`` (global max pooling, TSCD/AFA) or ``"gap"`` before the classifier.
        decoder_dim: SegFormer head width (256).
        decoder_dropout: dropout before the decoder's last conv (0.1).
        affinity_blocks: how many of the last stage-4 blocks feed the affinity head (2).
        symmetric_affinity: AFA's ``A + A^T`` before the affinity conv (TSCD: False).
    """

    def __init__(self, encoder: MixVisionTransformer, num_classes: int = 20, pooling: Literal["gmp", "gap"] = "gmp",
                 decoder_dim: int = 256, decoder_dropout: float = 0.1, affinity_blocks: int = 2,
                 symmetric_affinity: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"TSCDNet: `num_classes` must be >= 1 (foreground classes); got {num_classes}")
        if pooling not in POOLING_MODES:
            raise ValueError(f"TSCDNet: `pooling` must be 'gmp' or 'gap'; got {pooling!r}")
        if not 1 <= affinity_blocks <= encoder.depths[3]:
            raise ValueError(f"TSCDNet: `affinity_blocks` must be in [1, {encoder.depths[3]}] (stage-4 depth); "
                             f"got {affinity_blocks}")
        self.num_classes = num_classes
        self.pooling = pooling
        self.encoder = encoder
        dims = encoder.embed_dims
        self.classifier = nn.Conv2d(dims[3], num_classes, 1, bias=False)
        self.decoder = SegFormerHead(dims, num_classes + 1, embed_dim=decoder_dim, dropout=decoder_dropout)
        self.affinity_head = AffinityHead(affinity_blocks * encoder.num_heads[3], symmetric=symmetric_affinity)
        self.affinity_attn_blocks = tuple((3, encoder.depths[3] - k) for k in range(affinity_blocks, 0, -1))

    @property
    def checkpointing(self) -> str:
        """The activation-checkpointing mode: ``"off"``, ``"encoder"`` or ``"all"``."""
        return getattr(self, "_checkpointing", "off")

    def set_checkpointing(self, mode: str) -> None:
        """Activation checkpointing: ``"off"``, ``"encoder"`` (MiT blocks) or ``"all"`` (also decoder and
        affinity head); see the module docstring.

        Raises:
            ValueError: unknown ``mode``.
        """
        set_checkpointing(self, mode)

    def _affinity(self, attns: list[Tensor]) -> Tensor:
        if self.checkpointing == "all" and torch.is_grad_enabled():
            return checkpoint(lambda *a: self.affinity_head(list(a)), *attns, use_reentrant=False)
        return self.affinity_head(attns)

    def _pool(self, x4: Tensor) -> Tensor:
        if self.pooling == "gmp":
            return F.adaptive_max_pool2d(x4, 1)
        return F.adaptive_avg_pool2d(x4, 1)

    def forward(self, img: Tensor, cls_only: bool = False) -> TSCDOutput:
        """Training forward.

        Args:
            img: (B, 3, H, W) float, ImageNet-normalised.
            cls_only: skip decoder and affinity head (their outputs are ``None``), for classification-only
                iterations; goes through ``forward`` so that DDP wrappers still see the call.

        Returns:
            :class:`TSCDOutput` (cls_logits (B, C), seg_logits (B, C+1, H/4, W/4), affinity (B, N, N),
            cam (B, C, H/16, W/16); sizes round up).
        """
        feats, attns = self.encoder.forward_features(img, None if cls_only else self.affinity_attn_blocks)
        x4 = feats[3]
        cam = self.classifier(x4)
        cls_logits = self.classifier(self._pool(x4)).flatten(1)
        if cls_only:
            return TSCDOutput(cls_logits, None, None, cam)
        return TSCDOutput(cls_logits, self.decoder(feats), self._affinity(attns), cam)

    def forward_cam(self, img: Tensor) -> Tensor:
        """CAM-only forward: the encoder (SDPA, no attention maps) and the classifier's 1x1 conv on stage 4.

        Never runs the decoder or the affinity head. Gradients follow the caller's grad mode; the module's
        train/eval mode applies (drop-path is active in train mode).

        Args:
            img: (B, 3, H, W) float, ImageNet-normalised.

        Returns:
            cam (B, C, ceil(H/16), ceil(W/16)), raw (before ReLU).
        """
        return self.classifier(self.encoder.forward_features(img)[0][3])

    def load_checkpoint(self, path: str) -> None:
        """Load a full TSCDNet state dict from a local file (ours; ``model``/``state_dict`` wrappers and DDP or
        torch.compile prefixes are accepted), strictly.

        Raises:
            FileNotFoundError, RuntimeError, ValueError: as :func:`tscd.models._checkpoint.load_weights`.
        """
        load_weights(self, path, filter_fn=lambda sd: strip_prefixes(unwrap_state_dict(sd)), what="TSCDNet")
        logger.info("loaded TSCDNet weights from %s", path)


def _unwrap(model: nn.Module, caller: str = "param_groups") -> nn.Module:
    """The network (a TSCDNet, or another network with ``forward_cam`` such as ToCo's) inside DDP (``.module``) or
    torch.compile (``._orig_mod``) wrappers."""
    while not (isinstance(model, TSCDNet) or hasattr(type(model), "forward_cam")):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"{caller}: `model` must be a TSCDNet or a ToCoNet (possibly wrapped by DDP or "
                            f"torch.compile); got {type(model).__name__}")
        model = inner
    return model


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.01) -> list[dict]:
    """AdamW parameter groups (docs/method.md 2).

    * ``encoder``: encoder weights, ``lr``, ``weight_decay``;
    * ``encoder_norm``: the encoder's LayerNorm parameters, lr 0 and weight decay 0 (frozen by the optimizer;
      they still get gradients);
    * ``heads``: classifier + affinity conv, 10 x ``lr``;
    * ``decoder``: the SegFormer head, 10 x ``lr``.

    Each group also has ``name`` and ``lr_mult`` (its multiplier of ``lr``, for schedulers). Every parameter is
    in exactly one group.

    Args:
        model: a :class:`TSCDNet`, possibly wrapped by DDP or torch.compile.
        lr: base learning rate (6e-5 in docs/method.md 4.7).
        weight_decay: AdamW weight decay of all groups but ``encoder_norm``.

    Raises:
        TypeError: ``model`` is not a TSCDNet.
        ValueError: negative ``lr``/``weight_decay``, or a parameter outside the known parts.
    """
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"param_groups: `lr` and `weight_decay` must be >= 0; got lr={lr}, "
                         f"weight_decay={weight_decay}")
    net = _unwrap(model)
    norm_ids = {id(p) for m in net.encoder.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    parts: dict[str, list[nn.Parameter]] = {name: [] for name in LR_MULT}
    for p in net.encoder.parameters():
        parts["encoder_norm" if id(p) in norm_ids else "encoder"].append(p)
    parts["heads"] = list(net.classifier.parameters()) + list(net.affinity_head.parameters())
    parts["decoder"] = list(net.decoder.parameters())
    grouped = {id(p) for ps in parts.values() for p in ps}
    stray = [n for n, p in net.named_parameters() if id(p) not in grouped]
    if stray:
        raise ValueError(f"param_groups: parameters outside encoder/classifier/affinity_head/decoder: {stray[:8]}")
    return [{"name": name, "params": ps, "lr": lr * LR_MULT[name], "lr_mult": LR_MULT[name],
             "weight_decay": 0.0 if name == "encoder_norm" else weight_decay}
            for name, ps in parts.items()]


def set_checkpointing(net: nn.Module, mode: str) -> None:
    """``net.set_checkpointing(mode)`` of TSCDNet and ToCoNet: the encoder's blocks unless ``"off"``, the decoder
    (and what reads its flag) with ``"all"``.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"{type(net).__name__}.set_checkpointing: `mode` must be one of "
                         f"{', '.join(CHECKPOINTING_MODES)}; got {mode!r}")
    net._checkpointing = mode
    net.encoder.set_grad_checkpointing(mode != "off")
    net.decoder.grad_checkpointing = mode == "all"
