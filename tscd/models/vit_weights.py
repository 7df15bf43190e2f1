"""ViT encoder weights (ToCo's backbone) in the formats people download them in, recognised from keys and shapes.

Formats (never told apart by file name):

``timm``
    timm's and DeiT's ``VisionTransformer``: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm`` -- the keys of
    :class:`~tscd.models.vit.ViTEncoder`. Covers DeiT's ``.pth`` (``{"model": state_dict}``), timm's ``.pth`` and
    the Hugging Face hub's timm repos (``model.safetensors`` / ``pytorch_model.bin``), tscd's own encoder files
    and full :class:`~tscd.models.toco_net.ToCoNet` checkpoints (encoder under ``encoder.``).
``huggingface``
    transformers' ViT / DeiT (``ViTModel``, ``ViTForImageClassification``, ``DeiTForImageClassification``...), as
    saved on the hub (prefix ``vit.`` / ``deit.`` or none): ``embeddings.{cls_token,position_embeddings,
    patch_embeddings.projection}``, ``encoder.layer.{i}.{layernorm_before,attention.attention.{query,key,value},
    attention.output.dense,layernorm_after,intermediate.dense,output.dense}``, ``layernorm``; query, key and value
    are concatenated into timm's ``qkv``. transformers >= 5's layout in memory (``layers.{i}.attention.{q,k,v,
    o}_proj``, ``mlp.fc1/fc2``) is read too.

Classifier heads (``head``, ``classifier``, HF's ``pooler``) and the heads of a ToCo checkpoint (``classifier``,
``aux_classifier``, ``decoder``, ``proj_head``, ``proj_head_t``) are dropped and logged. Distilled DeiT checkpoints
(a distillation token) are refused. Anything else that is not part of the encoder, and any missing or mis-shaped
tensor, is an error that names the keys. Nothing is downloaded; pickles are read with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tscd.models._checkpoint import check_state_dict, strip_prefixes, unwrap_state_dict
from tscd.models.weights import WeightFormatError, _listed, read_weight_files

logger = logging.getLogger(__name__)

#: Top-level modules outside the encoder that are dropped, with what they are.
VIT_DROPPED_HEADS: dict[str, str] = {
    "head": "ImageNet classifier", "classifier": "classifier", "pooler": "Hugging Face pooler",
    "aux_classifier": "ToCo auxiliary classifier", "decoder": "ToCo segmentation decoder",
    "proj_head": "ToCo projection head", "proj_head_t": "ToCo teacher projection head",
}
#: Layout -> (description, key of the patch-embedding conv weight that anchors it).
_LAYOUTS: dict[str, tuple[str, str]] = {
    "timm": ("timm/DeiT ViT keys (patch_embed, cls_token, pos_embed, blocks.{i}, norm)", "patch_embed.proj.weight"),
    "huggingface": ("Hugging Face transformers ViT/DeiT (embeddings, encoder.layer.{i}, layernorm)",
                    "embeddings.patch_embeddings.projection.weight"),
}
_P = r"(?P<p>weight|bias)"
#: transformers' names (hub layout and transformers >= 5's) -> ours; a ``qkv`` group marks one third of ``qkv``.
_HF_RULES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(rx), ours) for rx, ours in (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (rf"embeddings\.patch_embeddings\.projection\.{_P}", "patch_embed.proj.{p}"),
    (rf"encoder\.layer\.(?P<i>\d+)\.layernorm_before\.{_P}", "blocks.{i}.norm1.{p}"),
    (rf"encoder\.layer\.(?P<i>\d+)\.attention\.attention\.(?P<qkv>query|key|value)\.{_P}", "blocks.{i}.attn.qkv.{p}"),
    (rf"encoder\.layer\.(?P<i>\d+)\.attention\.output\.dense\.{_P}", "blocks.{i}.attn.proj.{p}"),
    (rf"encoder\.layer\.(?P<i>\d+)\.layernorm_after\.{_P}", "blocks.{i}.norm2.{p}"),
    (rf"encoder\.layer\.(?P<i>\d+)\.intermediate\.dense\.{_P}", "blocks.{i}.mlp.fc1.{p}"),
    (rf"encoder\.layer\.(?P<i>\d+)\.output\.dense\.{_P}", "blocks.{i}.mlp.fc2.{p}"),
    (rf"layers\.(?P<i>\d+)\.layernorm_before\.{_P}", "blocks.{i}.norm1.{p}"),
    (rf"layers\.(?P<i>\d+)\.attention\.(?P<qkv>q|k|v)_proj\.{_P}", "blocks.{i}.attn.qkv.{p}"),
    (rf"layers\.(?P<i>\d+)\.attention\.o_proj\.{_P}", "blocks.{i}.attn.proj.{p}"),
    (rf"layers\.(?P<i>\d+)\.layernorm_after\.{_P}", "blocks.{i}.norm2.{p}"),
    (rf"layers\.(?P<i>\d+)\.mlp\.fc1\.{_P}", "blocks.{i}.mlp.fc1.{p}"),
    (rf"layers\.(?P<i>\d+)\.mlp\.fc2\.{_P}", "blocks.{i}.mlp.fc2.{p}"),
    (rf"layernorm\.{_P}", "norm.{p}"),
))
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


@dataclass
class ViTWeights:
    """ViT encoder weights read from a file, in :class:`~tscd.models.vit.ViTEncoder`'s key names.

    Attributes:
        state_dict: our keys -> tensors.
        format: ``timm`` or ``huggingface``.
        prefix: where the encoder was nested in the file (``""``, ``"vit."``, ``"deit."``, ``"encoder."`` ...).
        dropped: keys of the file that were dropped (heads), in the file's names.
        source: the file that was read.
        origin: for converted formats, our key -> the file's key(s) it came from (for messages).
    """

    state_dict: dict[str, Tensor]
    format: str
    prefix: str = ""
    dropped: list[str] = field(default_factory=list)
    source: str = ""
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def pos_grid(self) -> int | None:
        """g of the stored g x g positional embedding (``None`` if absent or not square)."""
        pe = self.state_dict.get("pos_embed")
        if pe is None or pe.ndim != 3:
            return None
        g = math.isqrt(pe.shape[1] - 1)
        return g if g * g == pe.shape[1] - 1 else None

    def describe(self) -> str:
        """One line: the layout recognised, where the encoder was, what was dropped."""
        where = f"encoder under {self.prefix!r}" if self.prefix else "bare encoder"
        if self.dropped:
            tops = dict.fromkeys(k[len(self.prefix):].split(".", 1)[0] if k.startswith(self.prefix) and self.prefix
                                 else k.split(".", 1)[0] for k in self.dropped)
            heads = ", ".join(f"{VIT_DROPPED_HEADS.get(t, t)} ({t}.*)" for t in tops)
            where += f"; dropped {len(self.dropped)} tensor(s) of {heads}"
        return f"{_LAYOUTS[self.format][0]} ({where})"

    def check(self, model: nn.Module, what: str = "ViT encoder") -> None:
        """Check that :attr:`state_dict` fits ``model`` exactly (keys and shapes), without loading it.

        Raises:
            ValueError: a positional-embedding grid other than the model's (says which ``pos_grid`` fits), or
                missing / unexpected / mis-shaped keys (named in our names and, for converted formats, the file's).
        """
        grid, ours = self.pos_grid, getattr(model, "pos_grid", None)
        if grid is not None and ours is not None and grid != ours and self.state_dict["pos_embed"].shape[-1] == \
                model.state_dict()["pos_embed"].shape[-1]:
            raise ValueError(f"read as {self.describe()}: its positional embedding is for a {grid}x{grid} token "
                             f"grid, the {what}'s for {ours}x{ours}: build the encoder with pos_grid={grid} "
                             f"(create_vit / create_toco_model take it from the file when `pos_grid` is not given)")
        note = (lambda k: self.origin.get(k, "?")) if self.origin else None
        try:
            check_state_dict(model, self.state_dict, what=what, key_note=note)
        except ValueError as e:
            raise ValueError(f"read as {self.describe()}: {e}") from None

    def load_into(self, model: nn.Module, what: str = "ViT encoder") -> None:
        """:meth:`check`, then load strictly into ``model`` and log what was read.

        Raises:
            ValueError: as :meth:`check`, the message starting with the file.
        """
        try:
            self.check(model, what)
        except ValueError as e:
            raise ValueError(f"{self.source!r}: {e}" if self.source else str(e)) from None
        model.load_state_dict(self.state_dict, strict=True)
        logger.info("loaded ViT encoder weights from %s: %s", self.source or "a state dict", self.describe())


def _detect(sd: Mapping[str, Tensor]) -> tuple[str, str]:
    found = []
    for fmt, (_, anchor) in _LAYOUTS.items():
        rx = re.compile(r"(?P<prefix>(?:[^.]+\.)*?)" + re.escape(anchor))
        found += [(fmt, m.group("prefix")) for k, v in sd.items() if (m := rx.fullmatch(k)) and v.ndim == 4]
    if not found:
        raise WeightFormatError(f"not a ViT encoder checkpoint in any known format: no 4-D patch-embedding weight "
                                f"named as in timm/DeiT ('patch_embed.proj.weight') or Hugging Face "
                                f"('vit.embeddings.patch_embeddings.projection.weight'); {len(sd)} key(s), the "
                                f"first: [{_listed(list(sd))}]")
    if len(found) > 1:
        raise WeightFormatError("ambiguous checkpoint: it holds more than one ViT encoder ("
                                + ", ".join(f"{f} under {p!r}" for f, p in found) + "); extract the one you want")
    return found[0]


def convert_vit_state_dict(obj: Mapping) -> ViTWeights:
    """Recognise the format of a checkpoint's contents and map it onto :class:`~tscd.models.vit.ViTEncoder` keys.

    Args:
        obj: what a checkpoint file holds: a state dict, possibly wrapped (``model``/``state_dict``) and with
            ``module.`` / ``_orig_mod.`` prefixes.

    Raises:
        WeightFormatError: (a ``ValueError``) a distilled DeiT; an unknown or ambiguous format; keys that are
            neither the encoder nor a known head; an incomplete or mis-shaped query/key/value triple.
    """
    sd = strip_prefixes(unwrap_state_dict(obj))
    distilled = [k for k in sd if k.rsplit(".", 1)[-1] in ("dist_token", "distillation_token")]
    if distilled:
        raise WeightFormatError(f"distilled DeiT checkpoints are not supported (found {distilled[0]!r}: a "
                                f"distillation token, which ToCo's ViT does not have); use the non-distilled "
                                f"weights, e.g. deit_base_patch16_224")
    fmt, prefix = _detect(sd)
    enc: dict[str, Tensor] = {}
    dropped: list[str] = []
    stray: list[str] = []
    for key, value in sd.items():
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if (rest if rest is not None else key).split(".", 1)[0] in VIT_DROPPED_HEADS:
            dropped.append(key)
        elif rest is not None:
            enc[rest] = value
        else:
            stray.append(key)
    context = f"read as {_LAYOUTS[fmt][0]} ({f'encoder under {prefix!r}' if prefix else 'bare encoder'})"
    if stray:
        raise WeightFormatError(f"{context}, but {len(stray)} key(s) are neither the encoder nor a known head "
                                f"({', '.join(f'{k}.*' for k in VIT_DROPPED_HEADS)}): [{_listed(stray)}]")
    if fmt == "timm":
        return ViTWeights(enc, fmt, prefix, dropped)
    out, origin = _from_hf(enc, prefix, context)
    return ViTWeights(out, fmt, prefix, dropped, origin=origin)


def _from_hf(enc: dict[str, Tensor], prefix: str, context: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    thirds: dict[str, dict[int, str]] = {}
    unknown: list[str] = []
    for key in enc:
        for rx, template in _HF_RULES:
            m = rx.fullmatch(key)
            if m:
                groups = m.groupdict()
                ours = template.format(**{k: v for k, v in groups.items() if k != "qkv"})
                if "qkv" in groups:
                    thirds.setdefault(ours, {})[_QKV_ORDER[groups["qkv"]]] = key
                else:
                    out[ours], origin[ours] = enc[key], prefix + key
                break
        else:
            unknown.append(prefix + key)
    problems = []
    for ours, parts in thirds.items():
        names = [prefix + parts[i] for i in sorted(parts)]
        if len(parts) < 3:
            problems.append(f"{ours} needs query, key and value; found only [{', '.join(names)}]")
            continue
        tensors = [enc[parts[i]] for i in range(3)]
        if len({tuple(t.shape) for t in tensors}) > 1:
            problems.append(" / ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors)) + " differ")
            continue
        out[ours], origin[ours] = torch.cat(tensors, dim=0), " + ".join(names)
    if unknown or problems:
        parts = [context + ", but"]
        if unknown:
            parts.append(f"{len(unknown)} key(s) are not part of a ViT encoder in that format: [{_listed(unknown)}]")
        if problems:
            parts.append(f"{len(problems)} query/key/value problem(s): [{_listed(problems)}]")
        raise WeightFormatError(" ".join(parts))
    return out, origin


def read_vit_weights(path: str | os.PathLike) -> ViTWeights:
    """Read ViT encoder weights from a local file, or a folder holding one (``model.safetensors``,
    ``pytorch_model.bin``, or a lone ``.safetensors``/``.bin``/``.pth``/``.pt``), in any format of this module.

    Raises:
        FileNotFoundError: no such path / no weight file in the folder.
        RuntimeError: unreadable or corrupt file; a pickle that needs arbitrary unpickling (refused).
        WeightFormatError: (a ``ValueError``) distilled, unknown format or incomplete encoder; the message starts
            with the path.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights path {os.fspath(path)!r} does not exist. Weights are never downloaded: give "
                                f"the local path of the file or folder (e.g. DeiT's deit_base_patch16_224-b5f2ef4d.pth "
                                f"or a Hugging Face download of timm/vit_base_patch16_224.orig_in21k_ft_in1k)")
    return read_weight_files(path, convert_vit_state_dict)


def load_vit_weights(encoder: nn.Module, path: str | os.PathLike) -> ViTWeights:
    """Load ViT encoder weights from a local file or folder (any format of this module) into ``encoder``, strictly.

    Returns:
        What was read (format, dropped heads).

    Raises:
        FileNotFoundError, RuntimeError: as :func:`read_vit_weights`.
        ValueError: unknown format, distilled DeiT, or weights that do not fit (missing / unexpected / mis-shaped
            keys named; a positional-embedding grid that differs says which ``pos_grid`` fits).
    """
    weights = read_vit_weights(path)
    weights.load_into(encoder)
    return weights
