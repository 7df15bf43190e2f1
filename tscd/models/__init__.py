"""Models: MiT encoder, SegFormer head, TSCD network, multi-scale CAMs (docs/method.md 1-3); ViT encoder and
ToCo network.

Factory::

    model = create_model("tscd_mit_b1", num_classes=20, pretrained="/data/weights/mit_b1.pth")
    encoder = create_backbone("mit_b0", strides=(4, 2, 2, 1))
    toco = create_toco_model("toco_vit_base", num_classes=20, pretrained="/data/weights/deit_base_patch16_224.pth")

``pretrained`` is a local path of encoder weights: SegFormer's ``mit_b*.pth``, a Hugging Face or mmsegmentation
MiT download, or one of ours (formats in :mod:`tscd.models.weights`); ``checkpoint_path`` a local full TSCDNet
checkpoint (for ToCo: DeiT / timm / Hugging Face ViT weights, :mod:`tscd.models.vit_weights`). Nothing is ever
downloaded; with neither, the model is randomly initialised and
a warning says so.
"""
from __future__ import annotations

import difflib
import logging

import torch

from tscd.models._checkpoint import check_state_dict, load_weights, read_checkpoint
from tscd.models._compile import StaticCompiled, compile_module
from tscd.models.cam import encode_pass, multi_scale_cam, multi_scale_cam_reference
from tscd.models.mit import MIT_CONFIGS, MixVisionTransformer, checkpoint_filter_fn, create_backbone, load_pretrained
from tscd.models.segformer_head import SegFormerHead
from tscd.models.toco_net import LargeFOV, ToCoNet, ToCoOutput
from tscd.models.toco_net import param_groups as toco_param_groups
from tscd.models.tscd_net import AffinityHead, TSCDNet, TSCDOutput
from tscd.models.tscd_net import param_groups as tscd_param_groups
from tscd.models.vit import VIT_CONFIGS, ViTEncoder, create_vit
from tscd.models.vit_weights import load_vit_weights, read_vit_weights

logger = logging.getLogger(__name__)

#: TSCD's encoder strides: stage 4 at 1/16 (docs/method.md 1).
TSCD_STRIDES: tuple[int, int, int, int] = (4, 2, 2, 1)

#: Model name -> encoder variant.
MODEL_CONFIGS: dict[str, str] = {f"tscd_{name}": name for name in MIT_CONFIGS}

_ENCODER_KWARGS = ("strides", "drop_path_rate", "drop_rate", "attn_drop_rate", "qkv_bias")

#: ToCo model name -> ViT variant (:data:`~tscd.models.vit.VIT_CONFIGS`).
TOCO_MODEL_CONFIGS: dict[str, str] = {"toco_vit_base": "vit_base", "toco_vit_small": "vit_small",
                                      "toco_vit_tiny": "vit_tiny_demo"}
_VIT_KWARGS = ("aux_layer", "drop_path_rate", "pos_grid")


def _check_name(op: str, name: str, valid, other, other_hint: str) -> None:
    """ValueError for a model ``name`` not in ``valid``: the valid names, the closest one, or what ``name`` is when
    it belongs to the ``other`` family."""
    if name in valid:
        return
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"; {name!r} is {other_hint}" if name in other else (f"; did you mean {close[0]!r}?" if close else "")
    raise ValueError(f"{op}: `name` must be one of {sorted(valid)}; got {name!r}{hint}")


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (``tscd_mit_b0`` .. ``tscd_mit_b5``)."""
    return sorted(MODEL_CONFIGS)


def create_model(name: str, num_classes: int = 20, pretrained: str | None = None,
                 checkpoint_path: str | None = None, **kwargs) -> TSCDNet:
    """Build a TSCDNet.

    Args:
        name: ``tscd_mit_b0`` .. ``tscd_mit_b5`` (TSCD uses ``tscd_mit_b1``).
        num_classes: foreground classes C.
        pretrained: local path (file or folder) of encoder weights: SegFormer, Hugging Face or mmsegmentation
            ImageNet MiT weights, or ours (see :mod:`tscd.models.weights`).
        checkpoint_path: local path of a full TSCDNet checkpoint (loaded after ``pretrained``, strictly).
        **kwargs: encoder options (``strides`` (default (4, 2, 2, 1)), ``drop_path_rate`` (0.1), ``drop_rate``,
            ``attn_drop_rate``, ``qkv_bias``) and :class:`TSCDNet` options (``pooling``, ``decoder_dim``,
            ``decoder_dropout``, ``affinity_blocks``, ``symmetric_affinity``).

    Raises:
        ValueError: unknown name (closest valid one suggested), bad options, weights that do not fit.
        FileNotFoundError, RuntimeError: missing or unreadable weight file.
    """
    _check_name("create_model", name, MODEL_CONFIGS, TOCO_MODEL_CONFIGS, "ToCo's ViT network: set recipe: toco")
    enc_kwargs = {k: kwargs.pop(k) for k in _ENCODER_KWARGS if k in kwargs}
    enc_kwargs.setdefault("strides", TSCD_STRIDES)
    if checkpoint_path is not None and pretrained is None:
        # the full checkpoint supplies the encoder: no random-init warning
        encoder = MixVisionTransformer(**{**MIT_CONFIGS[MODEL_CONFIGS[name]], **enc_kwargs})
    else:
        encoder = create_backbone(MODEL_CONFIGS[name], pretrained=pretrained, **enc_kwargs)
    model = TSCDNet(encoder, num_classes=num_classes, **kwargs)
    if checkpoint_path is not None:
        model.load_checkpoint(checkpoint_path)
    return model


def create_toco_model(name: str, num_classes: int = 20, pretrained: str | None = None,
                      checkpoint_path: str | None = None, **kwargs) -> ToCoNet:
    """Build a ToCoNet.

    Args:
        name: ``toco_vit_base`` (ViT-B/16 or DeiT-B/16 weights, ToCo's), ``toco_vit_small`` or ``toco_vit_tiny``
            (a tiny ViT for tests and the CPU demo).
        num_classes: foreground classes C.
        pretrained: local path (file or folder) of ImageNet ViT weights: DeiT's ``.pth``, timm's ``.pth`` /
            ``.safetensors``, or a Hugging Face ViT/DeiT download (see :mod:`tscd.models.vit_weights`); the
            positional-embedding grid is taken from it unless ``pos_grid`` is given. Nothing is downloaded.
        checkpoint_path: local path of a full ToCoNet checkpoint (loaded after ``pretrained``, strictly).
        **kwargs: encoder options (``aux_layer`` (ToCo: -3), ``drop_path_rate`` (0), ``pos_grid``) and
            :class:`ToCoNet` options (``decoder_dim`` (512), ``pooling`` ("gmp")).

    Raises:
        ValueError: unknown name (valid ones listed, the closest suggested), bad options, weights that do not fit.
        FileNotFoundError, RuntimeError: missing or unreadable weight file.
    """
    _check_name("create_toco_model", name, TOCO_MODEL_CONFIGS, MODEL_CONFIGS,
                "a TSCDNet (MiT): recipe toco trains ToCo's ViT (toco_vit_base)")
    enc_kwargs = {k: kwargs.pop(k) for k in _VIT_KWARGS if k in kwargs}
    variant = TOCO_MODEL_CONFIGS[name]
    if checkpoint_path is not None and pretrained is None:  # the full checkpoint supplies the encoder
        encoder = ViTEncoder(**{**VIT_CONFIGS[variant], **enc_kwargs})
    else:
        encoder = create_vit(variant, pretrained=pretrained, **enc_kwargs)
    model = ToCoNet(encoder, num_classes=num_classes, **kwargs)
    if checkpoint_path is not None:
        model.load_checkpoint(checkpoint_path)
    return model


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float = 0.01) -> list[dict]:
    """AdamW parameter groups of a :class:`TSCDNet` (:func:`tscd.models.tscd_net.param_groups`) or a
    :class:`ToCoNet` (:func:`tscd.models.toco_net.param_groups`), possibly wrapped by DDP or torch.compile.

    Raises:
        TypeError: neither a TSCDNet nor a ToCoNet.
        ValueError: as the two functions.
    """
    inner = model
    while not isinstance(inner, (TSCDNet, ToCoNet)):
        inner = getattr(inner, "module", None) or getattr(inner, "_orig_mod", None)
        if inner is None:
            break
    if isinstance(inner, ToCoNet):
        return toco_param_groups(model, lr, weight_decay)
    return tscd_param_groups(model, lr, weight_decay)


__all__ = [
    "AffinityHead", "MIT_CONFIGS", "MODEL_CONFIGS", "MixVisionTransformer", "SegFormerHead", "TSCDNet", "TSCDOutput",
    "TSCD_STRIDES", "check_state_dict", "checkpoint_filter_fn", "create_backbone", "create_model", "list_models",
    "load_pretrained", "load_weights", "multi_scale_cam", "multi_scale_cam_reference", "encode_pass", "param_groups",
    "read_checkpoint", "LargeFOV", "TOCO_MODEL_CONFIGS", "ToCoNet", "ToCoOutput", "VIT_CONFIGS", "ViTEncoder",
    "create_toco_model", "create_vit", "load_vit_weights", "read_vit_weights", "toco_param_groups",
    "tscd_param_groups", "StaticCompiled", "compile_module",
]
