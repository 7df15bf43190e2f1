"""Models: MiT encoder, SegFormer head, TSCD network, multi-scale CAMs (docs/method.md 1-3).

Factory::

    model = create_model("tscd_mit_b1", num_classes=20, pretrained="/data/weights/mit_b1.pth")
    encoder = create_backbone("mit_b0", strides=(4, 2, 2, 1))

``pretrained`` is a local path of encoder weights: SegFormer's ``mit_b*.pth``, a Hugging Face or mmsegmentation
MiT download, or one of ours (formats in :mod:`tscd.models.weights`); ``checkpoint_path`` a local full TSCDNet
checkpoint. Nothing is ever downloaded; with neither, the model is randomly initialised and
a warning says so.
"""
from __future__ import annotations

import difflib
import logging

from tscd.models._checkpoint import check_state_dict, load_weights, read_checkpoint
from tscd.models.cam import multi_scale_cam, multi_scale_cam_reference
from tscd.models.mit import MIT_CONFIGS, MixVisionTransformer, checkpoint_filter_fn, create_backbone, load_pretrained
from tscd.models.segformer_head import SegFormerHead
from tscd.models.tscd_net import AffinityHead, TSCDNet, TSCDOutput, param_groups

logger = logging.getLogger(__name__)

#: TSCD's encoder strides: stage 4 at 1/16 (docs/method.md 1).
TSCD_STRIDES: tuple[int, int, int, int] = (4, 2, 2, 1)

#: Model name -> encoder variant.
MODEL_CONFIGS: dict[str, str] = {f"tscd_{name}": name for name in MIT_CONFIGS}

_ENCODER_KWARGS = ("strides", "drop_path_rate", "drop_rate", "attn_drop_rate", "qkv_bias")


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
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, list(MODEL_CONFIGS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"create_model: `name` must be one of {list_models()}; got {name!r}{hint}")
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


__all__ = [
    "AffinityHead", "MIT_CONFIGS", "MODEL_CONFIGS", "MixVisionTransformer", "SegFormerHead", "TSCDNet", "TSCDOutput",
    "TSCD_STRIDES", "check_state_dict", "checkpoint_filter_fn", "create_backbone", "create_model", "list_models",
    "load_pretrained", "load_weights", "multi_scale_cam", "multi_scale_cam_reference", "param_groups",
    "read_checkpoint",
]
