"""MiT encoder weights in the formats people download them in, recognised from their keys and shapes.

Three sources are understood (never told apart by file name; see the README section "Pretrained weights"):

``segformer``
    SegFormer's released ImageNet MiT checkpoints (``mit_b*.pth``): ``patch_embed{i}.{proj,norm}``,
    ``block{i}.{j}.{norm1,attn.{q,kv,proj,sr,norm},norm2,mlp.{fc1,dwconv.dwconv,fc2}}``, ``norm{i}`` (stages
    1-4). These are exactly the keys of :class:`~tscd.models.mit.MixVisionTransformer`, so the format also covers
    tscd's own encoder files and full TSCDNet checkpoints (encoder under ``encoder.``).
``huggingface``
    transformers' SegFormer (``nvidia/mit-b0`` .. ``nvidia/mit-b5``: ``SegformerForImageClassification``, also
    ``SegformerModel`` and ``SegformerForSemanticSegmentation``), as ``model.safetensors``/``pytorch_model.bin``
    or the folder that holds them (sharded ``*.index.json`` folders too). Hub layout, stages 0-3 under
    ``segformer.encoder.``: ``patch_embeddings.{i}.{proj,layer_norm}``, ``block.{i}.{j}.{layer_norm_1,
    attention.self.{query,key,value,sr,layer_norm},attention.output.dense,layer_norm_2,mlp.{dense1,dwconv.dwconv,
    dense2}}``, ``layer_norm.{i}``; separate key and value projections become tscd's one ``kv`` as ``[key | value]``
    along the output channels. The layout of transformers >= 5 in memory (``segformer.stages.{i}.{patch_embeddings,
    blocks.{j}.{layernorm_before,attention.{q,k,v,o}_proj,...},layer_norm}``, written by
    ``save_pretrained(..., save_original_format=False)``) is read too.
``mmseg``
    mmsegmentation's MixVisionTransformer (bare, as its ``mit2mmseg`` converter writes it, or as ``backbone.`` of
    a segmentor checkpoint): ``layers.{i}.0.{projection,norm}`` (patch embedding), ``layers.{i}.1.{j}.{norm1,
    attn.attn.in_proj_{weight,bias},attn.attn.out_proj,attn.sr,attn.norm,norm2,ffn.layers.{0,1,4}}`` (blocks;
    ``in_proj`` stacks ``[q | k | v]``; the MLP's linear layers are 1x1 convs), ``layers.{i}.2`` (stage norm).

The classifier head of an ImageNet checkpoint (``head.*``, ``classifier.*``) and the heads of a full segmentation
checkpoint (``decode_head.*``, ``auxiliary_head.*``, TSCDNet's ``classifier``/``decoder``/``affinity_head``)
are dropped and reported; any other key that is not part of the encoder, and any encoder tensor that is missing,
is an error that names the keys and the format that was recognised.

Architecture notes: the weights fix dims, depths, reduction ratios and kernel sizes, not the strides, so
TSCD's ``(4, 2, 2, 1)`` loads ImageNet weights trained at ``(4, 2, 2, 2)``. LayerNorm eps is not stored either:
tscd keeps SegFormer's (1e-5 in the patch embeddings and the key/value reduction, 1e-6 in the blocks and stage
norms); transformers' port uses 1e-5 everywhere and mmseg 1e-6 everywhere. The effect is small: on a random tiny
model in transformers' own initialisation, tscd's stage outputs differ from transformers' by 4.5e-6 relative
(L2), 1.7e-5 at most.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tscd.models._checkpoint import MAX_LISTED, check_state_dict, read_checkpoint, strip_prefixes, unwrap_state_dict
from tscd.models.variants import MIT_CONFIGS

logger = logging.getLogger(__name__)

#: File names looked for, in this order, when ``pretrained`` is a folder (Hugging Face's names first).
FOLDER_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                                 "pytorch_model.bin.index.json")
#: Extensions of a lone weight file in a folder without any of :data:`FOLDER_FILES`.
WEIGHT_EXTENSIONS: tuple[str, ...] = (".safetensors", ".bin", ".pth", ".pt")
#: Top-level modules outside the encoder that are dropped, with what they are.
DROPPED_HEADS: dict[str, str] = {
    "head": "ImageNet classifier",
    "classifier": "classifier",
    "decode_head": "segmentation decode head",
    "auxiliary_head": "auxiliary segmentation head",
    "decoder": "TSCD segmentation decoder",
    "affinity_head": "TSCD affinity head",
}
#: The recognised formats and how they are described.
FORMAT_TITLES: dict[str, str] = {
    "segformer": "SegFormer/tscd MiT",
    "huggingface": "Hugging Face transformers SegFormer",
    "mmseg": "mmsegmentation MiT",
}


class WeightFormatError(ValueError):
    """Weights whose format is not recognised, or that do not form a complete MiT encoder in the format found."""


@dataclass(frozen=True)
class _Rule:
    """How tscd tensors come from a foreign layout's tensors.

    Templates hold ``{i}`` (stage: 1-based in tscd names, 0-based in foreign ones), ``{j}`` (block) and ``{p}``
    (``weight`` or ``bias``). ``kind``: ``copy`` (one to one), ``concat`` (several foreign tensors, concatenated
    along dim 0, make one tscd tensor), ``split_qkv`` (a stacked ``[q | k | v]`` becomes tscd's ``q`` and
    ``kv``), ``conv1x1`` (a 1x1-conv weight ``(out, in, 1, 1)`` becomes a linear weight ``(out, in)``).
    """

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    kind: str = "copy"


def _r(ours: str | tuple[str, ...], theirs: str | tuple[str, ...], kind: str = "copy") -> _Rule:
    return _Rule((ours,) if isinstance(ours, str) else ours, (theirs,) if isinstance(theirs, str) else theirs, kind)


def _blk(ours: str, theirs: str | tuple[str, ...], block: str, kind: str = "copy") -> _Rule:
    """A rule for one block parameter; ``block`` is the foreign block prefix, e.g. ``block.{i}.{j}.``."""
    theirs = (theirs,) if isinstance(theirs, str) else theirs
    return _Rule((f"block{{i}}.{{j}}.{ours}",), tuple(block + t for t in theirs), kind)


def _hf_hub_rules() -> tuple[_Rule, ...]:
    b = "block.{i}.{j}."
    return (
        _r("patch_embed{i}.proj.{p}", "patch_embeddings.{i}.proj.{p}"),
        _r("patch_embed{i}.norm.{p}", "patch_embeddings.{i}.layer_norm.{p}"),
        _blk("norm1.{p}", "layer_norm_1.{p}", b),
        _blk("attn.q.{p}", "attention.self.query.{p}", b),
        _blk("attn.kv.{p}", ("attention.self.key.{p}", "attention.self.value.{p}"), b, "concat"),
        _blk("attn.sr.{p}", "attention.self.sr.{p}", b),
        _blk("attn.norm.{p}", "attention.self.layer_norm.{p}", b),
        _blk("attn.proj.{p}", "attention.output.dense.{p}", b),
        _blk("norm2.{p}", "layer_norm_2.{p}", b),
        _blk("mlp.fc1.{p}", "mlp.dense1.{p}", b),
        _blk("mlp.dwconv.dwconv.{p}", "mlp.dwconv.dwconv.{p}", b),
        _blk("mlp.fc2.{p}", "mlp.dense2.{p}", b),
        _r("norm{i}.{p}", "layer_norm.{i}.{p}"),
    )


def _hf_v5_rules() -> tuple[_Rule, ...]:
    b = "stages.{i}.blocks.{j}."
    return (
        _r("patch_embed{i}.proj.{p}", "stages.{i}.patch_embeddings.proj.{p}"),
        _r("patch_embed{i}.norm.{p}", "stages.{i}.patch_embeddings.layer_norm.{p}"),
        _blk("norm1.{p}", "layernorm_before.{p}", b),
        _blk("attn.q.{p}", "attention.q_proj.{p}", b),
        _blk("attn.kv.{p}", ("attention.k_proj.{p}", "attention.v_proj.{p}"), b, "concat"),
        _blk("attn.sr.{p}", "attention.sequence_reduction.sequence_reduction.{p}", b),
        _blk("attn.norm.{p}", "attention.sequence_reduction.layer_norm.{p}", b),
        _blk("attn.proj.{p}", "attention.o_proj.{p}", b),
        _blk("norm2.{p}", "layernorm_after.{p}", b),
        _blk("mlp.fc1.{p}", "mlp.fc1.{p}", b),
        _blk("mlp.dwconv.dwconv.{p}", "mlp.dwconv.dwconv.{p}", b),
        _blk("mlp.fc2.{p}", "mlp.fc2.{p}", b),
        _r("norm{i}.{p}", "stages.{i}.layer_norm.{p}"),
    )


def _mmseg_rules() -> tuple[_Rule, ...]:
    b = "layers.{i}.1.{j}."
    return (
        _r("patch_embed{i}.proj.{p}", "layers.{i}.0.projection.{p}"),
        _r("patch_embed{i}.norm.{p}", "layers.{i}.0.norm.{p}"),
        _blk("norm1.{p}", "norm1.{p}", b),
        _Rule(("block{i}.{j}.attn.q.{p}", "block{i}.{j}.attn.kv.{p}"), (b + "attn.attn.in_proj_{p}",), "split_qkv"),
        _blk("attn.proj.{p}", "attn.attn.out_proj.{p}", b),
        _blk("attn.sr.{p}", "attn.sr.{p}", b),
        _blk("attn.norm.{p}", "attn.norm.{p}", b),
        _blk("norm2.{p}", "norm2.{p}", b),
        _blk("mlp.fc1.{p}", "ffn.layers.0.{p}", b, "conv1x1"),
        _blk("mlp.dwconv.dwconv.{p}", "ffn.layers.1.{p}", b),
        _blk("mlp.fc2.{p}", "ffn.layers.4.{p}", b, "conv1x1"),
        _r("norm{i}.{p}", "layers.{i}.2.{p}"),
    )


@dataclass(frozen=True)
class _Layout:
    """One key layout: its format, a description, the key of stage 1's patch-embedding conv, the rules."""

    format: str
    title: str
    signature: str
    rules: tuple[_Rule, ...] | None  # None: the keys are tscd's already


_LAYOUTS: tuple[_Layout, ...] = (
    _Layout("segformer", "SegFormer/tscd MiT keys (patch_embed{i}, block{i}.{j}, norm{i})", "patch_embed1.proj.weight",
            None),
    _Layout("huggingface", "Hugging Face transformers SegFormer, hub layout (patch_embeddings.{i}, block.{i}.{j}, "
            "layer_norm.{i})", "patch_embeddings.0.proj.weight", _hf_hub_rules()),
    _Layout("huggingface", "Hugging Face transformers SegFormer, transformers>=5 layout (stages.{i})",
            "stages.0.patch_embeddings.proj.weight", _hf_v5_rules()),
    _Layout("mmseg", "mmsegmentation MiT (layers.{i}.{0,1,2})", "layers.0.0.projection.weight", _mmseg_rules()),
)

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias)"}


def _template_regex(template: str) -> re.Pattern:
    rx = re.escape(template)
    for name, group in _PLACEHOLDERS.items():
        rx = rx.replace(re.escape("{" + name + "}"), group, 1).replace(re.escape("{" + name + "}"), f"(?P={name})")
    return re.compile(rx)


def _fill(template: str, binding: Mapping[str, str], stage_shift: int) -> str:
    i = binding.get("i")
    return template.format(i=int(i) + stage_shift if i is not None else "", j=binding.get("j", ""),
                           p=binding.get("p", ""))


def _listed(keys: list[str]) -> str:
    more = f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else ""
    return ", ".join(keys[:MAX_LISTED]) + more


@dataclass
class MiTWeights:
    """MiT encoder weights read from a file, in tscd's key names.

    Attributes:
        state_dict: tscd :class:`~tscd.models.mit.MixVisionTransformer` keys -> tensors.
        format: ``segformer``, ``huggingface`` or ``mmseg``.
        layout: a description of the key layout that was recognised.
        prefix: where the encoder was nested in the file (``""``, ``"segformer.encoder."``, ``"backbone."`` ...).
        dropped: keys of the file that were dropped (classifier / decode heads), in the file's names.
        source: the file that was read (inside the folder, if a folder was given).
    """

    state_dict: dict[str, Tensor]
    format: str
    layout: str
    prefix: str = ""
    dropped: list[str] = field(default_factory=list)
    source: str = ""
    _layout: _Layout | None = field(default=None, repr=False)

    @property
    def title(self) -> str:
        """How the format is described in messages, e.g. ``Hugging Face transformers SegFormer``."""
        return FORMAT_TITLES[self.format]

    def file_key(self, key: str) -> str:
        """The name (or names, joined by ``+``) in the file of the tensor that becomes tscd key ``key``."""
        rules = self._layout.rules if self._layout is not None else None
        if not rules:
            return self.prefix + key
        for rule in rules:
            for ours in rule.ours:
                m = _template_regex(ours).fullmatch(key)
                if m:
                    return " + ".join(self.prefix + _fill(t, m.groupdict(), -1) for t in rule.theirs)
        return self.prefix + key

    def num_params(self) -> int:
        """Number of encoder parameters (elements of every tensor in :attr:`state_dict`)."""
        return sum(t.numel() for t in self.state_dict.values())

    def describe(self) -> str:
        """One line: what was read, e.g. ``Hugging Face transformers SegFormer, hub layout (...) (encoder under
        'segformer.encoder.'; dropped 2 tensor(s) of classifier (classifier.*))``."""
        where = f"encoder under {self.prefix!r}" if self.prefix else "bare encoder"
        if self.dropped:
            where += f"; dropped {len(self.dropped)} tensor(s) of {_dropped_heads(self.dropped)}"
        return f"{self.layout} ({where})"

    def check(self, model: nn.Module, what: str = "MiT encoder") -> None:
        """Check that :attr:`state_dict` fits ``model`` exactly (keys and shapes), without loading it.

        Raises:
            ValueError: missing / unexpected / mis-shaped keys, named in tscd's names and, for foreign formats,
                the file's, together with the format that was recognised.
        """
        foreign = self._layout is not None and self._layout.rules is not None
        try:
            check_state_dict(model, self.state_dict, what=what, key_note=self.file_key if foreign else None)
        except ValueError as e:
            raise ValueError(f"read as {self.describe()}: {e}") from None

    def load_into(self, model: nn.Module, what: str = "MiT encoder") -> None:
        """:meth:`check`, then load :attr:`state_dict` into ``model`` strictly.

        Raises:
            ValueError: as :meth:`check`.
        """
        self.check(model, what)
        model.load_state_dict(self.state_dict, strict=True)


def _dropped_heads(keys: list[str]) -> str:
    tops = []
    for k in keys:
        top = k.split(".", 1)[0]
        name = DROPPED_HEADS.get(top, top)
        label = f"{name} ({top}.*)"
        if label not in tops:
            tops.append(label)
    return ", ".join(tops)


def detect_layout(state_dict: Mapping[str, Tensor]) -> tuple[_Layout, str]:
    """Recognise the key layout of ``state_dict`` from its keys and shapes: ``(layout, prefix)``.

    The anchor is stage 1's patch-embedding conv weight (a 4-D tensor), named as each layout names it; the prefix
    is whatever precedes it (``""``, ``"segformer.encoder."``, ``"backbone."``, ``"encoder."`` ...).

    Raises:
        WeightFormatError: no layout, or more than one, is found.
    """
    found: list[tuple[_Layout, str]] = []
    for layout in _LAYOUTS:
        rx = re.compile(r"(?P<prefix>(?:[^.]+\.)*?)" + re.escape(layout.signature))
        for key, value in state_dict.items():
            m = rx.fullmatch(key)
            if m and isinstance(value, Tensor) and value.ndim == 4:
                found.append((layout, m.group("prefix")))
    if not found:
        keys = list(state_dict)
        raise WeightFormatError(
            f"not a MiT encoder checkpoint in any known format: no 4-D stage-1 patch-embedding weight named as in "
            f"SegFormer/tscd ('patch_embed1.proj.weight'), Hugging Face ('segformer.encoder.patch_embeddings.0.proj."
            f"weight' or 'segformer.stages.0.patch_embeddings.proj.weight') or mmsegmentation "
            f"('layers.0.0.projection.weight'); {len(keys)} key(s), the first: [{_listed(keys)}]")
    if len(found) > 1:
        what = ", ".join(f"{lay.title} under {pre!r}" for lay, pre in found)
        raise WeightFormatError(f"ambiguous checkpoint: it holds more than one MiT encoder ({what}); extract the one "
                                f"you want into its own file")
    return found[0]


def convert_state_dict(obj: Mapping) -> MiTWeights:
    """Recognise the format of a checkpoint's contents and map it onto tscd's MiT keys.

    Args:
        obj: what a checkpoint file holds: a state dict, possibly wrapped (``state_dict``/``model``) and with
            ``module.`` / ``_orig_mod.`` prefixes, in one of the formats of this module.

    Returns:
        The encoder tensors under tscd names (foreign tensors are converted: ``kv`` = ``[key | value]``, ``q``/``kv``
        split from mmseg's ``in_proj``, 1x1-conv weights flattened), with what was recognised and dropped.

    Raises:
        WeightFormatError: unknown or ambiguous format; keys that are neither encoder nor a known head; an encoder
            tensor whose partner is missing (e.g. a key projection without its value projection); bad shapes.
    """
    sd = strip_prefixes(unwrap_state_dict(obj))
    layout, prefix = detect_layout(sd)
    enc: dict[str, Tensor] = {}
    dropped: list[str] = []
    stray: list[str] = []
    for key, value in sd.items():
        top = key.split(".", 1)[0]
        if prefix and key.startswith(prefix):
            enc[key[len(prefix):]] = value
        elif top in DROPPED_HEADS:
            dropped.append(key)
        elif prefix == "":
            enc[key] = value
        else:
            stray.append(key)
    where = f"encoder under {prefix!r}" if prefix else "bare encoder"
    context = f"read as {layout.title} ({where})"
    if stray:
        raise WeightFormatError(f"{context}, but {len(stray)} key(s) are neither the encoder nor a known head "
                                f"({', '.join(f'{k}.*' for k in DROPPED_HEADS)}): [{_listed(stray)}]")
    out = enc if layout.rules is None else _apply_rules(enc, layout, prefix, context)
    return MiTWeights(out, layout.format, layout.title, prefix, dropped, _layout=layout)


def _apply_rules(enc: dict[str, Tensor], layout: _Layout, prefix: str, context: str) -> dict[str, Tensor]:
    rules = layout.rules or ()
    compiled = [[_template_regex(t) for t in rule.theirs] for rule in rules]
    groups: dict[tuple, dict[int, str]] = {}
    unknown: list[str] = []
    for key in enc:
        for r, regexes in enumerate(compiled):
            hit = next(((t, m) for t, rx in enumerate(regexes) if (m := rx.fullmatch(key))), None)
            if hit is not None:
                t, m = hit
                groups.setdefault((r, tuple(sorted(m.groupdict().items()))), {})[t] = key
                break
        else:
            unknown.append(key)
    out: dict[str, Tensor] = {}
    incomplete: list[str] = []
    errors: list[str] = []
    for (r, binding), found in groups.items():
        rule, bind = rules[r], dict(binding)
        if len(found) < len(rule.theirs):
            incomplete += [prefix + _fill(t, bind, 0) for n, t in enumerate(rule.theirs) if n not in found]
            continue
        names = [found[n] for n in range(len(rule.theirs))]
        try:
            values = _convert(rule.kind, [enc[k] for k in names], names)
        except ValueError as e:
            errors.append(str(e))
            continue
        for template, value in zip(rule.ours, values):
            out[_fill(template, bind, 1)] = value
    if unknown or incomplete or errors:
        parts = [context + ", but"]
        if unknown:
            parts.append(f"{len(unknown)} key(s) are not part of a MiT encoder in that format: "
                         f"[{_listed([prefix + k for k in unknown])}]")
        if incomplete:
            parts.append(f"{len(incomplete)} key(s) are missing: [{_listed(incomplete)}]")
        if errors:
            parts.append(f"{len(errors)} tensor(s) have the wrong shape: [{_listed(errors)}]")
        raise WeightFormatError(" ".join(parts))
    return out


def _convert(kind: str, tensors: list[Tensor], names: list[str]) -> list[Tensor]:
    """Apply one rule's conversion (see :class:`_Rule`); shapes are checked, the error names the key."""
    if kind == "copy":
        return tensors
    if kind == "concat":  # separate key / value projections -> tscd's kv, [key | value] along the outputs
        first = tuple(tensors[0].shape)
        if any(tuple(t.shape) != first for t in tensors):
            raise ValueError(" / ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors)) + " differ")
        return [torch.cat(tensors, dim=0)]
    if kind == "split_qkv":  # mmseg's in_proj = [q | k | v] -> q, kv = [k | v]
        t = tensors[0]
        if t.shape[0] % 3 or (t.ndim == 2 and t.shape[0] != 3 * t.shape[1]) or t.ndim > 2:
            raise ValueError(f"{names[0]} {tuple(t.shape)}: expected (3C, C) or (3C,)")
        c = t.shape[0] // 3
        return [t[:c], t[c:]]
    if kind == "conv1x1":  # mmseg's MLP: 1x1 convs -> linear layers
        t = tensors[0]
        if t.ndim == 4:
            if t.shape[2:] != (1, 1):
                raise ValueError(f"{names[0]} {tuple(t.shape)}: expected a 1x1 conv weight (out, in, 1, 1)")
            return [t.reshape(t.shape[0], t.shape[1])]
        return [t]
    raise AssertionError(f"unknown conversion kind {kind!r}")  # programming error, not user input


def resolve_weight_file(path: str | os.PathLike) -> list[str]:
    """The file(s) to read for ``path``: the file itself, or, for a folder, the weights inside it.

    A folder is searched for :data:`FOLDER_FILES` (Hugging Face's names; an ``*.index.json`` lists the shards of
    a sharded download), else for a lone file ending in one of :data:`WEIGHT_EXTENSIONS`.

    Raises:
        FileNotFoundError: ``path`` does not exist, or the folder holds no weight file (the message lists it).
        WeightFormatError: a folder with several candidate files and none of Hugging Face's names.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"weights path {path!r} does not exist. Weights are never downloaded: give the "
                                    f"local path of the file or folder (e.g. SegFormer's mit_b1.pth, or the folder "
                                    f"of a Hugging Face download of nvidia/mit-b1)")
        return [path]
    for name in FOLDER_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            if not name.endswith(".index.json"):
                return [candidate]
            return _shards(candidate)
    entries = sorted(os.listdir(path))
    lone = [e for e in entries if e.endswith(WEIGHT_EXTENSIONS) and os.path.isfile(os.path.join(path, e))]
    if len(lone) == 1:
        return [os.path.join(path, lone[0])]
    if len(lone) > 1:
        raise WeightFormatError(f"folder {path!r} holds several weight files {lone} and none of {list(FOLDER_FILES)}; "
                                f"give the path of the file to use")
    raise FileNotFoundError(f"weights path {path!r} is a directory with no weight file in it: looked for "
                            f"{list(FOLDER_FILES)} or one file ending in {list(WEIGHT_EXTENSIONS)}; it holds "
                            f"{entries[:MAX_LISTED]}")


def _shards(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightFormatError(f"{index_path!r} is not a valid shard index (a JSON object with a 'weight_map' of "
                                f"key -> shard file): {type(e).__name__}: {e}") from None
    folder = os.path.dirname(index_path)
    for name in files:
        if os.path.basename(name) != name:
            raise WeightFormatError(f"{index_path!r}: shard name {name!r} is not a plain file name in the folder")
    return [os.path.join(folder, name) for name in files]


def read_mit_weights(path: str | os.PathLike) -> MiTWeights:
    """Read MiT encoder weights from a local file or folder in any format of this module.

    Nothing runs from the file: safetensors are read with ``safetensors``, pickles (``.pth``, ``.bin``) only with
    ``torch.load(weights_only=True)``, and one that needs arbitrary unpickling is refused.

    Raises:
        FileNotFoundError: no such file / no weight file in the folder.
        RuntimeError: unreadable or corrupt file; :class:`~tscd.models._checkpoint.UnsafeCheckpointError` for a
            pickle that would need arbitrary unpickling.
        WeightFormatError: (a ``ValueError``) unknown format or an incomplete encoder; the message starts with
            the path.
    """
    return read_weight_files(path, convert_state_dict)


def read_weight_files(path: str | os.PathLike, convert):
    """The tensors of a local weight file or folder (shards merged; :func:`resolve_weight_file`), converted by
    ``convert`` (raising ValueError) into a weights object whose ``source`` is set to the file read.

    Raises:
        WeightFormatError: ``convert``'s ValueError, its message prefixed with the path.
    """
    files = resolve_weight_file(path)
    raw: dict = {}
    for file in files:
        raw.update(read_checkpoint(file))
    source = files[0] if len(files) == 1 else f"{os.fspath(path)} ({len(files)} shards)"
    try:
        weights = convert(raw)
    except ValueError as e:
        raise WeightFormatError(f"{source!r}: {e}") from None
    weights.source = source
    return weights


@dataclass(frozen=True)
class MiTArchitecture:
    """What the weights fix about a MiT encoder (not the strides, which have no weights)."""

    in_chans: int
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    sr_ratios: tuple[int, ...]
    mlp_ratios: tuple[float, ...]

    @property
    def variant(self) -> str | None:
        """The :data:`~tscd.models.variants.MIT_CONFIGS` name with these dims and depths (``mit_b1``), else
        ``None``."""
        return next((name for name, cfg in MIT_CONFIGS.items()
                     if tuple(cfg["embed_dims"]) == self.embed_dims and tuple(cfg["depths"]) == self.depths), None)


def infer_architecture(state_dict: Mapping[str, Tensor]) -> MiTArchitecture:
    """Dims, depths, reduction ratios and MLP ratios of the encoder in a tscd-named ``state_dict``.

    Raises:
        WeightFormatError: a stage's patch embedding or first block is missing.
    """
    dims, depths, srs, ratios = [], [], [], []
    in_chans = 0
    for i in range(1, 5):
        w = state_dict.get(f"patch_embed{i}.proj.weight")
        fc1 = state_dict.get(f"block{i}.0.mlp.fc1.weight")
        if w is None or fc1 is None:
            lacking = f"patch_embed{i}.proj.weight" if w is None else f"block{i}.0.mlp.fc1.weight"
            raise WeightFormatError(f"incomplete MiT encoder: stage {i} has no {lacking}")
        if i == 1:
            in_chans = int(w.shape[1])
        dims.append(int(w.shape[0]))
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"block{i}\.(\d+)\.", k))}
        depths.append(max(blocks) + 1)
        sr = state_dict.get(f"block{i}.0.attn.sr.weight")
        srs.append(int(sr.shape[-1]) if sr is not None else 1)
        ratios.append(fc1.shape[0] / fc1.shape[1])
    return MiTArchitecture(in_chans, tuple(dims), tuple(depths), tuple(srs), tuple(ratios))
