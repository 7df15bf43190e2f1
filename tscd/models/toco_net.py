"""ToCo's network (Ru et al., CVPR 2023, "Token Contrast for Weakly-Supervised Semantic Segmentation").

Written from the paper and the behaviour of the official code: a :class:`~tscd.models.vit.ViTEncoder`, a 1x1-conv
classifier on the final patch tokens (GMP, CAM), an auxiliary 1x1-conv classifier on an intermediate block's
tokens (the auxiliary CAM that ToCo's pseudo labels for patch-token contrast come from), and DeepLab's LargeFOV
segmentation decoder on the final token map. All maps are at the token grid ``(H // p, W // p)``.

The projection heads of ToCo's class-token contrast (and their EMA teacher) belong to the training recipe, not
here: :meth:`ToCoNet.encode_cls` gives the class token they read.

Entry points, each explicit about what it runs:

* :meth:`ToCoNet.forward` (training): encoder, both classifiers, decoder -> :class:`ToCoOutput` (``cls_only``
  skips the decoder).
* :meth:`ToCoNet.forward_cam` / :meth:`ToCoNet.forward_cams` (pseudo labels, evaluation): encoder and the
  classifier convs only.
* :meth:`ToCoNet.encode_cls`: encoder only, the final class token.
"""
from __future__ import annotations

import logging
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tscd.models._checkpoint import load_weights, strip_prefixes, unwrap_state_dict
from tscd.models.tscd_net import POOLING_MODES, set_checkpointing
from tscd.models.tscd_net import _unwrap as unwrap_network
from tscd.models.vit import ViTEncoder

logger = logging.getLogger(__name__)

#: Learning-rate multipliers of the parameter groups (ToCo's optimizer: encoder 1x, norms included, heads 10x).
TOCO_LR_MULT: dict[str, float] = {"encoder": 1.0, "heads": 10.0, "decoder": 10.0}


class ToCoOutput(NamedTuple):
    """Outputs of :meth:`ToCoNet.forward` for (B, 3, H, W); the token grid is h = H // p, w = W // p.

    The first four fields are those of :class:`~tscd.models.tscd_net.TSCDOutput`.

    Attributes:
        cls_logits: (B, C) classification logits (GMP/GAP of the final token map, then the classifier).
        seg_logits: (B, C + 1, h, w) LargeFOV segmentation logits, or ``None`` with ``cls_only``.
        affinity: always ``None`` (ToCo has no affinity head).
        cam: (B, C, h, w) raw CAM (classifier conv on the final token map, before ReLU), with grad.
        cls_aux_logits: (B, C) logits of the auxiliary classifier (pooled intermediate token map).
        cam_aux: (B, C, h, w) raw auxiliary CAM, with grad.
        tokens: (B, D, h, w) the final (normalised) patch tokens as a map.
        cls_token: (B, D) the final class token.
    """

    cls_logits: Tensor
    seg_logits: Tensor | None
    affinity: Tensor | None
    cam: Tensor
    cls_aux_logits: Tensor
    cam_aux: Tensor
    tokens: Tensor
    cls_token: Tensor


class LargeFOV(nn.Module):
    """DeepLab-v1's LargeFOV head as ToCo uses it: 3x3 conv (dilation 5) -> ReLU -> 3x3 conv (dilation 5) -> ReLU
    -> 1x1 conv, no biases, PyTorch's default init.

    Args:
        in_dim: input channels.
        num_classes: output channels (C + 1 with background).
        dim: hidden channels (512).
        dilation: dilation (and padding) of the 3x3 convs (5).
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 512, dilation: int = 5) -> None:
        super().__init__()
        self.conv6 = nn.Conv2d(in_dim, dim, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(dim, dim, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv8 = nn.Conv2d(dim, num_classes, 1, bias=False)
        self.grad_checkpointing = False

    def _body(self, x: Tensor) -> Tensor:
        return self.conv8(F.relu(self.conv7(F.relu(self.conv6(x)))))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim, h, w) -> (B, num_classes, h, w)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._body, x, use_reentrant=False)
        return self._body(x)


class ToCoNet(nn.Module):
    """ToCo's network: ViT encoder, classifier + auxiliary classifier (CAMs), LargeFOV decoder.

    Args:
        encoder: a :class:`ViTEncoder` (ToCo: ViT-B/16 or DeiT-B/16, ``aux_layer`` -3).
        num_classes: foreground classes C (VOC 20, COCO 80); the decoder predicts C + 1.
        decoder_dim: LargeFOV width (512).
        pooling: ``"gmp"`` (global max pooling, ToCo) or ``"gap"`` before both classifiers.

    Raises:
        ValueError: ``num_classes`` < 1, unknown ``pooling``, ``decoder_dim`` < 1.
    """

    def __init__(self, encoder: ViTEncoder, num_classes: int = 20, decoder_dim: int = 512,
                 pooling: Literal["gmp", "gap"] = "gmp") -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ToCoNet: `num_classes` must be >= 1 (foreground classes); got {num_classes}")
        if pooling not in POOLING_MODES:
            raise ValueError(f"ToCoNet: `pooling` must be 'gmp' or 'gap'; got {pooling!r}")
        if decoder_dim < 1:
            raise ValueError(f"ToCoNet: `decoder_dim` must be >= 1; got {decoder_dim}")
        self.num_classes = num_classes
        self.pooling = pooling
        self.encoder = encoder
        dim = encoder.embed_dim
        self.classifier = nn.Conv2d(dim, num_classes, 1, bias=False)
        self.aux_classifier = nn.Conv2d(dim, num_classes, 1, bias=False)
        self.decoder = LargeFOV(dim, num_classes + 1, decoder_dim)

    @property
    def checkpointing(self) -> str:
        """The activation-checkpointing mode: ``"off"``, ``"encoder"`` or ``"all"``."""
        return getattr(self, "_checkpointing", "off")

    def set_checkpointing(self, mode: str) -> None:
        """Activation checkpointing: ``"off"``, ``"encoder"`` (the ViT blocks) or ``"all"`` (also the decoder);
        applies to forwards with grad enabled.

        Raises:
            ValueError: unknown ``mode``.
        """
        set_checkpointing(self, mode)

    def _pool(self, x: Tensor) -> Tensor:
        return F.adaptive_max_pool2d(x, 1) if self.pooling == "gmp" else F.adaptive_avg_pool2d(x, 1)

    def _maps(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encoder -> (class token (B, D), final token map (B, D, h, w), auxiliary token map (B, D, h, w))."""
        cls, tokens, aux = self.encoder.forward_features(img)
        h, w = self.encoder.grid_size(*img.shape[-2:])

        def to_map(t: Tensor) -> Tensor:
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

        return cls, to_map(tokens), to_map(aux)

    def forward(self, img: Tensor, cls_only: bool = False) -> ToCoOutput:
        """Training forward.

        Args:
            img: (B, 3, H, W) float, ImageNet-normalised; H, W >= the patch size.
            cls_only: skip the decoder (``seg_logits`` is ``None``).

        Returns:
            :class:`ToCoOutput` (maps at the token grid (H // p, W // p)).
        """
        cls, fmap, aux = self._maps(img)
        cam, cam_aux = self.classifier(fmap), self.aux_classifier(aux)
        cls_logits = self.classifier(self._pool(fmap)).flatten(1)
        cls_aux_logits = self.aux_classifier(self._pool(aux)).flatten(1)
        seg = None if cls_only else self.decoder(fmap)
        return ToCoOutput(cls_logits, seg, None, cam, cls_aux_logits, cam_aux, fmap, cls)

    def forward_cam(self, img: Tensor) -> Tensor:
        """CAM-only forward (the interface of :meth:`TSCDNet.forward_cam`): encoder + classifier conv, no decoder.

        Args:
            img: (B, 3, H, W) float, ImageNet-normalised.

        Returns:
            cam (B, C, H // p, W // p), raw (before ReLU); gradients follow the caller's grad mode.
        """
        return self.classifier(self._maps(img)[1])

    def forward_cams(self, img: Tensor) -> tuple[Tensor, Tensor]:
        """Both CAMs, no decoder: ``(cam, cam_aux)``, each (B, C, H // p, W // p), raw."""
        _, fmap, aux = self._maps(img)
        return self.classifier(fmap), self.aux_classifier(aux)

    def encode_cls(self, img: Tensor) -> Tensor:
        """The final class token (B, D) of ``img`` (encoder only; for the views of ToCo's class-token contrast)."""
        return self.encoder.forward_features(img)[0]

    def load_checkpoint(self, path: str) -> None:
        """Load a full ToCoNet state dict from a local file (ours; wrappers and DDP / torch.compile prefixes are
        accepted), strictly.

        Raises:
            FileNotFoundError, RuntimeError, ValueError: as :func:`tscd.models._checkpoint.load_weights`.
        """
        load_weights(self, path, filter_fn=lambda sd: strip_prefixes(unwrap_state_dict(sd)), what="ToCoNet")
        logger.info("loaded ToCoNet weights from %s", path)


def _unwrap(model: nn.Module) -> ToCoNet:
    net = unwrap_network(model, "toco param_groups")
    if not isinstance(net, ToCoNet):
        raise TypeError(f"toco param_groups: `model` must be a ToCoNet (possibly wrapped by DDP or torch.compile); "
                        f"got {type(net).__name__}")
    return net


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.01) -> list[dict]:
    """AdamW parameter groups of ToCo's optimizer.

    * ``encoder``: every trainable encoder parameter (LayerNorms and the class token included), ``lr``;
    * ``heads``: classifier + auxiliary classifier, 10 x ``lr``;
    * ``decoder``: LargeFOV, 10 x ``lr``.

    All with ``weight_decay``; each group has ``name``, ``params``, ``lr``, ``lr_mult`` and ``weight_decay``.
    Frozen parameters (the positional embedding) are left out; every trainable parameter is in exactly one group.

    Args:
        model: a :class:`ToCoNet`, possibly wrapped by DDP or torch.compile.
        lr: base learning rate.
        weight_decay: AdamW weight decay.

    Raises:
        TypeError: ``model`` is not a ToCoNet.
        ValueError: negative ``lr``/``weight_decay``, or a trainable parameter outside the known parts.
    """
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"param_groups: `lr` and `weight_decay` must be >= 0; got lr={lr}, "
                         f"weight_decay={weight_decay}")
    net = _unwrap(model)
    parts = {"encoder": net.encoder, "heads": nn.ModuleList([net.classifier, net.aux_classifier]),
             "decoder": net.decoder}
    groups = {name: [p for p in m.parameters() if p.requires_grad] for name, m in parts.items()}
    grouped = {id(p) for ps in groups.values() for p in ps}
    stray = [n for n, p in net.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:
        raise ValueError(f"param_groups: trainable parameters outside encoder/classifier/aux_classifier/decoder: "
                         f"{stray[:8]}")
    return [{"name": name, "params": ps, "lr": lr * TOCO_LR_MULT[name], "lr_mult": TOCO_LR_MULT[name],
             "weight_decay": weight_decay} for name, ps in groups.items()]
