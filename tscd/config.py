"""Training configuration: YAML files in configs/ read into documented dataclasses, and the one resolution.

* Unknown keys fail, naming the closest valid key; values are type-checked; every field carries its legal values
  (:func:`option`: ``choices`` or a :class:`Range`), checked by :func:`validate`.
* One ``base:`` file at most (a path relative to the config file): its values are the defaults.
* Overrides ``section.key=value`` (values parsed as YAML) come from the command line; ``recipe=<name>`` picks the
  training method.
* ``recipe: <name>`` (default ``tscd``) selects the recipe (:mod:`tscd.method.recipes`); a recipe's own keys live
  in a section named after it (e.g. ``afa:``). The sections ``data`` ... ``train`` are shared by every recipe.
* :func:`resolve_config` turns a loaded config plus the machine (device, world size) into the config that runs:
  the only place where a mode changes other keys (``--max-iters``, the recipe's defaults, ``train.memory: low``,
  ``train.reference_style``, ``train.amp: auto``, ``train.device: auto``). It logs every change with its reason;
  the trainer saves its result as ``<run_dir>/config.yaml``, so that file reproduces the run.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass(frozen=True)
class Range:
    """Legal values of a numeric key: ``lo`` / ``hi`` bounds (None: unbounded), open or closed; ``meaning`` is
    appended to the error message (e.g. what 0 means)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    meaning: str = ""

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        lo = "-inf" if self.lo is None else self.lo
        return f"in {'(' if self.lo_open else '['}{lo}, {self.hi}{')' if self.hi_open else ']'}"


_POS = Range(0, lo_open=True)  # > 0
_NONNEG = Range(0)  # >= 0
_ONE = Range(1)  # >= 1
_UNIT = Range(0, 1)  # [0, 1]
_FRACTION = Range(0, 1, lo_open=True)  # (0, 1]


def option(default: Any, *, choices: tuple[str, ...] | str | None = None, range: Range | None = None,
           non_empty: bool = False) -> Any:
    """A config field with its legal values, checked by :func:`validate`.

    Args:
        default: the default value (immutable: a scalar, a tuple or None).
        choices: the legal names, as a tuple or as ``"module:NAME"``, the tuple (or dict, or function returning
            the names) that defines them where they are used (e.g. ``"tscd.kernels._backend:BACKENDS"``), so the
            config never keeps a copy of another module's list.
        range: legal numeric values (of every element, for tuples).
        non_empty: a tuple that must not be empty.
    """
    meta: dict[str, Any] = {}
    if choices is not None:
        meta["choices"] = choices
    if range is not None:
        meta["range"] = range
    if non_empty:
        meta["non_empty"] = True
    return field(default=default, metadata=meta)


def choices_of(spec: tuple[str, ...] | str) -> tuple[str, ...]:
    """The names a ``choices`` spec of :func:`option` stands for (imports ``module`` for ``"module:NAME"``)."""
    if isinstance(spec, str):
        module, name = spec.split(":")
        spec = getattr(importlib.import_module(module), name)
        if callable(spec):
            spec = spec()
    return tuple(spec)


#: ``train.memory`` values; ``low`` is applied by :func:`resolve_config`.
MEMORY_MODES: tuple[str, ...] = ("default", "low")
#: train.compile: what goes through torch.compile ("on", YAML's bare `true`, is resolved to "all")
COMPILE_MODES: tuple[str, ...] = ("off", "forward", "cams", "all", "on")
#: ``train.amp`` values; ``auto`` is resolved per device by :func:`resolve_config`.
AMP_MODES: tuple[str, ...] = ("off", "bf16", "auto")


@dataclass
class DataConfig:
    """Dataset and loader (docs/method.md 5)."""

    dataset: str = option("voc", choices="tscd.data.factory:DATASET_NAMES")  #: voc | coco | custom | demo
    root: str | None = None  #: dataset root (demo: None generates the data in memory)
    train_split: str = "train_aug"
    val_split: str = "val"
    crop_size: int = option(512, range=Range(16))  #: random crop of the training images
    #: random rescale range (new size int(r * h): floor)
    scale_range: tuple[float, float] = option((0.5, 2.0), range=_POS)
    #: crop canvas: black (official raw 0) | mean | [r, g, b] (checked by tscd.data.transforms.resolve_pad_value)
    pad_value: str | tuple[float, float, float] = option("black", range=Range(0, 255, meaning="RGB on the 0..255 "
                                                                                                "scale"))
    #: GLOBAL batch, split evenly across processes (official: 2 GPUs x 2 = 4)
    batch_size: int = option(4, range=_ONE)
    num_workers: int = option(4, range=_NONNEG)
    #: validate on the first N images only (None: all)
    val_num: int | None = option(None, range=Range(1, meaning="null validates on every image"))
    skip_bad: bool = False  #: skip unreadable files with a warning instead of failing
    demo_num_train: int = option(1000, range=_ONE)  #: demo set: images in train
    demo_num_val: int = option(100, range=_ONE)  #: demo set: images in val
    demo_size: int = option(96, range=Range(16))  #: demo set: image side


@dataclass
class ModelConfig:
    """Network (docs/method.md 2)."""

    name: str = "tscd_mit_b1"  #: tscd_mit_b0 .. tscd_mit_b5
    pretrained: str | None = None  #: local path of SegFormer ImageNet MiT weights (mit_b1.pth); None: random init
    pooling: str = option("gmp", choices="tscd.models.tscd_net:POOLING_MODES")  #: gmp | gap
    symmetric_affinity: bool = False  #: AFA's A + A^T (TSCD: False)
    drop_path_rate: float = option(0.1, range=Range(0, 1, hi_open=True))
    decoder_dim: int = option(256, range=_ONE)  #: SegFormer head width


@dataclass
class PseudoLabelConfig:
    """Multi-scale CAMs and their VARM refinement (docs/method.md 3, 4.1)."""

    cam_scales: tuple[float, ...] = option((1.0, 0.5, 1.5), range=_POS, non_empty=True)
    bkg_high: float = option(0.55, range=_UNIT)  #: background score of the "high" refinement
    bkg_low: float = option(0.35, range=_UNIT)  #: background score of the "low" refinement
    cam_bkg: float = option(0.45, range=_UNIT)  #: background threshold of the (unrefined) CAM label, for evaluation
    refine_mode: str = option("varm", choices="tscd.kernels.refine:MODES")  #: varm (TSCD) | par (AFA)
    refine_iters: int = option(10, range=Range(0, meaning="0 skips the propagation"))
    dilations: tuple[int, ...] = option((1, 2, 4, 8, 12, 24), range=_ONE, non_empty=True)
    refine_scale: float = option(0.5, range=_FRACTION)  #: refinement runs at this fraction of the crop size
    cam_decoder: bool = True  #: run the decoder in the CAM passes (no grad, output discarded) so its BN running
    #: statistics update as in the official code; false: decoder-free CAM passes (faster, different BN statistics)
    #: off (official) | bf16: autocast in the CAM passes only (the labels are argmaxes of refined CAMs)
    cam_amp: str = option("off", choices=("off", "bf16"))
    #: together (official: image and flip in one pass) | separate (two passes of B images: lower peak memory)
    cam_flip: str = option("together", choices=("together", "separate"))
    #: pass (official) | forward: the image's scale-1 CAM from the training forward (TSCD / AFA, one micro-batch:
    #: the scale-1 pass then runs the flip only)
    cam_scale1: str = option("pass", choices=("pass", "forward"))


@dataclass
class LossConfig:
    """Loss weights and options (docs/method.md 4)."""

    cls: float = option(1.0, range=_NONNEG)
    seg: float = option(0.1, range=_NONNEG)
    reg: float = option(0.01, range=_NONNEG)  #: CRF energy loss (0 disables it)
    aff: float = option(0.1, range=_NONNEG)
    scd: float = option(0.1, range=_NONNEG)
    er: float = option(0.1, range=_NONNEG)  #: weight of the equivariance term when er_mode is grad
    #: off (the official term has zero gradient) | grad (extension: a real L1 term)
    er_mode: str = option("off", choices=("off", "grad"))
    scd_samples: int = option(40, range=_ONE)  #: random samples per side (S x S points per view)
    scd_scale: float = option(0.3, range=_FRACTION)  #: size of the second view
    aff_radius: int = option(8, range=_ONE)
    crf_sigma_rgb: float = option(15.0, range=_POS)
    crf_sigma_xy: float = option(100.0, range=_POS)
    crf_scale: float = option(0.5, range=_FRACTION)
    #: field (the rloss/Kraehenbuehl lattice gain `reg` was tuned on) | exact (Gaussian)
    crf_gain: str = option("field", choices="tscd.kernels.permutohedral:CRF_GAINS")


@dataclass
class OptimConfig:
    """AdamW with poly schedule and warm-up (docs/method.md 4.7)."""

    lr: float = option(6e-5, range=_POS)
    weight_decay: float = option(0.01, range=_NONNEG)
    betas: tuple[float, float] = option((0.9, 0.999), range=Range(0, 1, hi_open=True))
    warmup_iters: int = option(1500, range=Range(0, meaning="0: no warm-up"))
    warmup_ratio: float = option(1e-6, range=_UNIT)
    power: float = option(1.0, range=_NONNEG)


@dataclass
class TrainConfig:
    """The loop."""

    max_iters: int = option(20000, range=_ONE)
    #: classification loss only while the 0-based iteration <= cam_iters (cam_iters + 1 its)
    cam_iters: int = option(2000, range=Range(0, meaning="0: no classification-only warm-up"))
    #: micro-batches per process and iteration (gradient accumulation; 1: all at once)
    accum_steps: int = option(1, range=_ONE)
    log_iters: int = option(50, range=_ONE)
    val_iters: int = option(2000, range=Range(0, meaning="0: validate only at the end"))  #: validate every N its
    ckpt_iters: int = option(1000, range=Range(0, meaning="0: checkpoint only at the end"))  #: checkpoint every N
    keep_ckpts: int = option(3, range=_ONE)  #: keep the last N checkpoints
    seed: int = option(0, range=_NONNEG)
    device: str = "auto"  #: auto | cpu | cuda | cuda:N (auto is resolved to the device the run uses)
    #: off (fp32, official) | bf16 (autocast, low-memory option) | auto (bf16 on GPU only; resolved per device)
    amp: str = option("off", choices=AMP_MODES)
    #: torch.compile (inductor, random ops through the eager generator: eager's numbers to float rounding):
    #: off | forward (the trained forwards and their backward) | cams (the no-grad CAM passes, one static graph per
    #: scale and view) | all (both; `true` means all, `false` off)
    compile: str = option("off", choices=COMPILE_MODES)
    channels_last: bool = False
    cudnn_benchmark: bool = False  #: off for reproducibility
    #: training on the CPU: reuse (glibc keeps freed memory for the next iteration instead of handing large blocks
    #: back to the kernel and faulting them in again; same numbers, the process keeps its peak memory) | system
    host_memory: str = option("reuse", choices="tscd.train.host_memory:HOST_MEMORY_MODES")
    #: kernel backend of the fused ops (auto | cuda | triton | cpp | torch)
    backend: str = option("auto", choices="tscd.kernels._backend:BACKENDS")
    reference_style: bool = False  #: the official-code mode (benchmark baseline): the official code's structure
    #: (full-model CAM passes, one refine call per image and threshold, torch backends, CRF loss on the host; chosen
    #: by the recipe) and numerics (fp32, black padding, field CRF gain, decoder BN updates in CAM passes; set by
    #: resolve_config) whatever the other keys say
    run_dir: str = "runs/tscd"
    tensorboard: bool = True
    image_iters: int = option(0, range=Range(0, meaning="0: log images at validation"))  #: log images every N its
    #: activation checkpointing: off | encoder (MiT blocks) | all (+ decoder, affinity)
    checkpointing: str = option("off", choices="tscd.models.tscd_net:CHECKPOINTING_MODES")
    #: default | low: bf16 autocast, checkpointing all, micro-batches of one image (gradient accumulation keeps the
    #: global batch); applied by resolve_config
    memory: str = option("default", choices=MEMORY_MODES)
    plots: bool = True  #: at the end, write <run_dir>/val_grid.png and curves.png (matplotlib)


#: The sections every recipe shares, in file order.
SECTIONS: tuple[str, ...] = ("data", "model", "pseudo", "loss", "optim", "train")


@dataclass
class Config:
    """A whole configuration: the recipe's name, the shared sections and the recipe's own section."""

    recipe: str = option("tscd", choices="tscd.method.recipes:recipe_names")  #: the training method
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: recipe sections by recipe name (only the selected recipe's may be given); see :attr:`recipe_cfg`
    sections: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        #: ``section.key`` names set by a file or an override (the recipe's defaults apply to the others)
        self.explicit: set[str] = set()

    @property
    def recipe_cfg(self) -> Any:
        """The selected recipe's own section (an instance of its ``config_class``), or None if it has none."""
        cls = _recipe_config_class(self.recipe)
        if cls is None:
            return None
        if not isinstance(self.sections.get(self.recipe), cls):
            self.sections[self.recipe] = cls()
        return self.sections[self.recipe]

    def to_dict(self) -> dict:
        """Plain values in file order: ``recipe``, the shared sections, then the recipe's own section."""
        out: dict[str, Any] = {"recipe": self.recipe}
        out.update({name: _to_plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS})
        if self.recipe_cfg is not None:
            out[self.recipe] = _to_plain(dataclasses.asdict(self.recipe_cfg))
        return out


def _recipe_config_class(name: str) -> type | None:
    from tscd.method.recipes import find_recipe

    recipe = find_recipe(name)
    return None if recipe is None else recipe.config_class


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp`` (str, int, float, bool, tuples, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for alt in args[:-1]:  # several alternatives (e.g. a name or a list): the first that accepts the value
            try:
                return _coerce(value, alt, where)
            except ConfigError:
                pass
        return _coerce(value, args[-1], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: `{where}` must be a list; got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config: `{where}` must have {len(args)} values; got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: `{where}` must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: `{where}` must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config: `{where}` must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `off` / `on` as a boolean
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"config: `{where}` must be a string; got {value!r}")
        return value
    return value


def _apply(cfg: Config, data: dict, source: str) -> None:
    from tscd.method.recipes import find_recipe, recipe_names

    for sec_name, values in data.items():
        if sec_name == "base":
            continue
        if sec_name == "recipe":
            cfg.recipe = _coerce(values, str, "recipe")
            cfg.explicit.add("recipe")
            continue
        recipe = find_recipe(sec_name)
        if sec_name in SECTIONS:
            section = getattr(cfg, sec_name)
        elif recipe is not None and recipe.config_class is not None:
            if not isinstance(cfg.sections.get(sec_name), recipe.config_class):
                cfg.sections[sec_name] = recipe.config_class()
            section = cfg.sections[sec_name]
        else:
            valid = ["recipe", *SECTIONS, *(n for n in recipe_names() if find_recipe(n).config_class is not None)]
            what = f"recipe {sec_name!r} has no section" if recipe is not None else f"unknown section `{sec_name}`"
            raise ConfigError(f"config ({source}): {what}; valid sections: {', '.join(valid)}."
                              f"{_closest(sec_name, valid)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config ({source}): section `{sec_name}` must be a mapping; got {values!r}")
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            if key not in hints:
                valid = list(hints)
                raise ConfigError(f"config ({source}): unknown key `{sec_name}.{key}`; valid keys of `{sec_name}`: "
                                  f"{', '.join(valid)}.{_closest(key, valid)}")
            setattr(section, key, _coerce(value, hints[key], f"{sec_name}.{key}"))
            cfg.explicit.add(f"{sec_name}.{key}")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections; got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, str | None, Any]:
    """``"train.max_iters=100"`` -> ("train", "max_iters", 100); ``"recipe=afa"`` -> ("recipe", None, "afa")."""
    if "=" not in text:
        raise ConfigError(f"config: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    if key == "recipe":
        return "recipe", None, value
    if key.count(".") != 1:
        raise ConfigError(f"config: override key {key!r} must be section.key (e.g. train.max_iters)")
    section, name = key.split(".")
    return section, name, value


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> None:
    """Apply ``section.key=value`` / ``recipe=name`` overrides to ``cfg`` in order (type-checked, not validated)."""
    for text in overrides:
        section, name, value = parse_override(text)
        _apply(cfg, {section: value if name is None else {name: value}}, f"override {text!r}")


def config_from_dict(data: dict, source: str) -> Config:
    """A :class:`Config` from plain values (a checkpoint's ``config``), type-checked, not validated."""
    cfg = Config()
    _apply(cfg, data, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Defaults <- ``base:`` file <- ``path`` <- ``overrides``, then :func:`validate` (unless ``check`` is False).

    The result is the config as written; :func:`resolve_config` makes it the config that runs on a machine.
    """
    cfg = Config()
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
        base = data.get("base")
        if base is not None:
            base_data = _read_yaml((path.parent / base).resolve())
            if "base" in base_data:
                raise ConfigError(f"config: {base} has its own `base:`; one level of inheritance at most")
            _apply(cfg, base_data, str(base))
        _apply(cfg, data, str(path))
    apply_overrides(cfg, overrides or [])
    if check:
        validate(cfg)
    return cfg


def _fields(cfg: Config):
    """(``section.key``, value, dataclass field) of every field of the shared sections and the recipe's section."""
    yield "recipe", cfg.recipe, next(f for f in dataclasses.fields(cfg) if f.name == "recipe")
    sections = [(name, getattr(cfg, name)) for name in SECTIONS]
    if cfg.recipe_cfg is not None:
        sections.append((cfg.recipe, cfg.recipe_cfg))
    for name, section in sections:
        for f in dataclasses.fields(section):
            yield f"{name}.{f.name}", getattr(section, f.name), f


def validate(cfg: Config) -> None:
    """The legal values of every field (:func:`check_ranges`, choices) and cross-field checks, with clear messages.

    Raises:
        ConfigError: naming the key, what is legal and what was given.
    """
    from tscd.method.recipes import find_recipe, recipe_names

    if find_recipe(cfg.recipe) is None:
        raise ConfigError(f"config: `recipe` must be one of {', '.join(recipe_names())}; got {cfg.recipe!r}."
                          f"{_closest(cfg.recipe, list(recipe_names()))}")
    stray = [name for name in cfg.sections if name != cfg.recipe]
    if stray:
        raise ConfigError(f"config: section `{stray[0]}` configures recipe {stray[0]!r}, but `recipe` is "
                          f"{cfg.recipe!r}; set recipe: {stray[0]} or remove the section")
    check_ranges(cfg)
    for where, value, f in _fields(cfg):
        if "choices" in f.metadata and isinstance(value, str):
            options = choices_of(f.metadata["choices"])
            if value not in options:
                raise ConfigError(f"config: `{where}` must be one of {', '.join(options)}; got {value!r}")
    from tscd.data.transforms import resolve_pad_value

    try:
        resolve_pad_value(cfg.data.pad_value)
    except ValueError as err:
        raise ConfigError(f"config: `data.pad_value`: {err}") from None
    if cfg.train.cam_iters > cfg.train.max_iters:
        raise ConfigError(f"config: `train.cam_iters` must be in [0, train.max_iters={cfg.train.max_iters}]; "
                          f"got {cfg.train.cam_iters} (`tscd train --max-iters N` scales it down for short runs)")
    if cfg.pseudo.bkg_low > cfg.pseudo.bkg_high:
        raise ConfigError(f"config: `pseudo.bkg_low` ({cfg.pseudo.bkg_low}) must be <= `pseudo.bkg_high` "
                          f"({cfg.pseudo.bkg_high})")
    lo, hi = cfg.data.scale_range
    if lo > hi:
        raise ConfigError(f"config: `data.scale_range` must be [low, high] with low <= high; got {[lo, hi]}")
    if cfg.data.dataset in ("voc", "coco", "custom") and not cfg.data.root:
        raise ConfigError(f"config: `data.root` is required for dataset {cfg.data.dataset!r}")


def check_ranges(cfg: Config) -> None:
    """Check every field that has a ``range`` (and ``non_empty``) in its :func:`option`; raises
    :class:`ConfigError` naming the key, its legal range and the bad value. NaN and infinities are rejected."""
    for where, value, f in _fields(cfg):
        rng = f.metadata.get("range")
        if value is None or (rng is None and not f.metadata.get("non_empty")):
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        if f.metadata.get("non_empty") and not values:
            raise ConfigError(f"config: `{where}` must not be empty")
        for v in values:
            if rng is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # a name (e.g. data.pad_value: black) is checked where it is resolved
            if not rng.contains(v):
                what = f"every value of `{where}`" if isinstance(value, (tuple, list)) else f"`{where}`"
                hint = f" ({rng.meaning})" if rng.meaning else ""
                raise ConfigError(f"config: {what} must be {rng}{hint}; got {value!r}")


# ----------------------------------------------------------------------------------------------
# Resolution: the config that runs
# ----------------------------------------------------------------------------------------------

class Change(NamedTuple):
    """One value :func:`resolve_config` changed, and why."""

    key: str
    old: Any
    new: Any
    why: str

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r} ({self.why})"


def _max_iters_changes(cfg: Config, max_iters: int) -> list[tuple[str, Any, str]]:
    """(key, new value, reason) for ``--max-iters``: the run length, and warm-ups that no longer fit, scaled."""
    old = cfg.train.max_iters
    out: list[tuple[str, Any, str]] = [("train.max_iters", max_iters, f"--max-iters {max_iters}")]
    for section, key in (("train", "cam_iters"), ("optim", "warmup_iters")):
        value = getattr(getattr(cfg, section), key)
        if max_iters >= 1 and value > max_iters:
            new = min(max_iters, value * max_iters // max(old, 1))
            out.append((f"{section}.{key}", new, f"--max-iters {max_iters}: `{section}.{key}` {value} > {max_iters}; "
                                                  f"scaled with the run length ({old} -> {max_iters} iterations) "
                                                  f"to {new}"))
    return out


def fit_max_iters(cfg: Config, max_iters: int) -> list[str]:
    """Set ``train.max_iters`` (``tscd train --max-iters N``) and shorten what no longer fits, in proportion.

    ``train.cam_iters`` (the classification-only warm-up) and ``optim.warmup_iters`` (the LR warm-up) larger than
    ``max_iters`` are scaled by ``max_iters / old max_iters`` (so a 20k-iteration config run for 200 iterations
    keeps a 10 % warm-up instead of failing validation). Modifies ``cfg``; returns one note per adjusted warm-up.
    :func:`resolve_config` does the same (and logs it) when given ``max_iters``.
    """
    notes = []
    for key, new, why in _max_iters_changes(cfg, max_iters):
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, new)
        if key != "train.max_iters":
            notes.append(why)
    return notes


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "data.pad_value":
        from tscd.data.transforms import resolve_pad_value

        try:
            return resolve_pad_value(a) == resolve_pad_value(b)
        except ValueError:
            return False
    return a == b


def resolve_config(cfg: Config, device: Any = "cpu", world_size: int = 1, max_iters: int | None = None,
                   check: bool = True) -> tuple[Config, list[Change]]:
    """The config that runs: ``cfg`` as loaded, with every mode applied for this machine; each change logged.

    In this order (a later step wins):

    1. ``max_iters`` (``tscd train --max-iters N``): the run length; warm-ups longer than it are scaled
       (:func:`fit_max_iters`).
    2. The recipe's defaults (``Recipe.defaults``), for keys no file or override set, and the keys the recipe has
       no use for (``Recipe.unused``), set to the value that says so.
    3. ``train.memory: low``: ``train.amp: bf16``, ``train.checkpointing: all``, ``train.accum_steps`` for
       micro-batches of one image per process (``data.batch_size / world_size``).
    4. ``train.reference_style``: the official numerics (``train.amp: off``, ``pseudo.cam_decoder: true``,
       ``loss.crf_gain: field``, ``data.pad_value: black``), whatever the keys say (logged as warnings).
    5. ``train.amp: auto``: ``bf16`` on a CUDA device, ``off`` elsewhere; ``train.device: auto``: the device type.

    Resolving a resolved config changes nothing, so the saved result reproduces the run.

    Args:
        cfg: a loaded config (:func:`load_config`, possibly with ``check=False``); not modified.
        device: the device the run uses (``torch.device`` or its name).
        world_size: processes sharing the global batch.
        max_iters: ``--max-iters``, or None.
        check: :func:`validate` the result.

    Returns:
        (the resolved config, the changes in the order they were made).

    Raises:
        ConfigError: the result is not valid (``check``), or the recipe is unknown.
    """
    from tscd.method.recipes import find_recipe

    out = copy.deepcopy(cfg)
    changes: list[Change] = []
    device_type = str(getattr(device, "type", device)).split(":")[0]

    def put(key: str, value: Any, why: str, level: int = logging.INFO) -> None:
        section, name = key.split(".")
        obj = out.recipe_cfg if section == out.recipe else getattr(out, section)
        old = getattr(obj, name)
        if _same(key, old, value):
            return
        setattr(obj, name, value)
        changes.append(Change(key, old, value, why))
        logger.log(level, "config: %s", changes[-1])

    if max_iters is not None:
        for key, value, why in _max_iters_changes(out, max_iters):
            put(key, value, why, logging.WARNING)
    recipe = find_recipe(out.recipe)
    if recipe is None and check:
        validate(out)  # names the valid recipes
    if recipe is not None:
        for key, value in recipe.defaults.items():
            if key not in out.explicit:
                put(key, value, f"recipe {out.recipe}'s default")
        for key, value in recipe.unused.items():
            put(key, value, f"recipe {out.recipe} has no use for it")
    t = out.train
    if t.memory == "low":
        put("train.amp", "bf16", "train.memory: low")
        put("train.checkpointing", "all", "train.memory: low")
        put("train.accum_steps", max(1, out.data.batch_size // max(1, world_size)),
            f"train.memory: low: micro-batches of one image ({out.data.batch_size} images over {world_size} "
            f"process(es))")
    if t.reference_style:
        official = {"train.amp": "off", "pseudo.cam_decoder": True, "loss.crf_gain": "field",
                    "data.pad_value": "black", "pseudo.cam_amp": "off", "pseudo.cam_flip": "together",
                    "pseudo.cam_scale1": "pass"}
        for key, value in official.items():
            put(key, value, "train.reference_style: the official numerics", logging.WARNING)
    if t.compile == "on":
        put("train.compile", "all", "train.compile: true compiles the forwards and the CAM passes")
    if t.amp == "auto":
        put("train.amp", "bf16" if device_type == "cuda" else "off", f"train.amp: auto on a {device_type} device")
    if t.device == "auto":
        put("train.device", device_type, "train.device: auto")
    if check:
        validate(out)
    return out, changes


def save_config(cfg: Config, path: str | Path, changes: list[Change] | tuple[Change, ...] = ()) -> None:
    """Write ``cfg`` as YAML; ``changes`` (from :func:`resolve_config`) become comment lines at the top."""
    head = "".join(f"# resolved: {c}\n" for c in changes)
    Path(path).write_text(head + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
