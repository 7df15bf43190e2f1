"""Training configuration: YAML files in configs/ read into documented dataclasses.

* Unknown keys fail, naming the closest valid key; values are type-checked.
* One ``base:`` file at most (a path relative to the config file): its values are the defaults.
* Overrides ``section.key=value`` (values parsed as YAML) come from the command line.
* The resolved configuration is saved in the run directory (``config.yaml``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


@dataclass
class DataConfig:
    """Dataset and loader (docs/method.md 5)."""

    dataset: str = "voc"  #: voc | coco | custom | demo
    root: str | None = None  #: dataset root (demo: None generates the data in memory)
    train_split: str = "train_aug"
    val_split: str = "val"
    crop_size: int = 512  #: random crop of the training images
    scale_range: tuple[float, float] = (0.5, 2.0)  #: random rescale range (new size int(r * h): floor)
    pad_value: str | tuple[float, float, float] = "black"  #: crop canvas: black (official raw 0) | mean | [r, g, b]
    batch_size: int = 4  #: GLOBAL batch, split evenly across processes (official: 2 GPUs x 2 = 4)
    num_workers: int = 4
    val_num: int | None = None  #: validate on the first N images only (None: all)
    skip_bad: bool = False  #: skip unreadable files with a warning instead of failing
    demo_num_train: int = 1000  #: demo set: images in train
    demo_num_val: int = 100  #: demo set: images in val
    demo_size: int = 96  #: demo set: image side


@dataclass
class ModelConfig:
    """Network (docs/method.md 2)."""

    name: str = "tscd_mit_b1"  #: tscd_mit_b0 .. tscd_mit_b5
    pretrained: str | None = None  #: local path of SegFormer ImageNet MiT weights (mit_b1.pth); None: random init
    pooling: str = "gmp"  #: gmp | gap
    symmetric_affinity: bool = False  #: AFA's A + A^T (TSCD: False)
    drop_path_rate: float = 0.1
    decoder_dim: int = 256  #: SegFormer head width


@dataclass
class PseudoLabelConfig:
    """Multi-scale CAMs and their VARM refinement (docs/method.md 3, 4.1)."""

    cam_scales: tuple[float, ...] = (1.0, 0.5, 1.5)
    bkg_high: float = 0.55  #: background score of the "high" refinement
    bkg_low: float = 0.35  #: background score of the "low" refinement
    cam_bkg: float = 0.45  #: background threshold of the (unrefined) CAM label, for evaluation
    refine_mode: str = "varm"  #: varm (TSCD) | par (AFA)
    refine_iters: int = 10
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    refine_scale: float = 0.5  #: refinement runs at this fraction of the crop size
    cam_decoder: bool = True  #: run the decoder in the CAM passes (no grad, output discarded) so its BN running
    #: statistics update as in the official code; false: decoder-free CAM passes (faster, different BN statistics)


@dataclass
class LossConfig:
    """Loss weights and options (docs/method.md 4)."""

    cls: float = 1.0
    seg: float = 0.1
    reg: float = 0.01  #: CRF energy loss (0 disables it)
    aff: float = 0.1
    scd: float = 0.1
    er: float = 0.1  #: weight of the equivariance term when er_mode is grad
    er_mode: str = "off"  #: off (the official term has zero gradient) | grad (extension: a real L1 term)
    scd_samples: int = 40  #: random samples per side (S x S points per view)
    scd_scale: float = 0.3  #: size of the second view
    aff_radius: int = 8
    crf_sigma_rgb: float = 15.0
    crf_sigma_xy: float = 100.0
    crf_scale: float = 0.5
    crf_gain: str = "field"  #: field (the rloss/Kraehenbuehl lattice gain `reg` was tuned on) | exact (Gaussian)


@dataclass
class OptimConfig:
    """AdamW with poly schedule and warm-up (docs/method.md 4.7)."""

    lr: float = 6e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    power: float = 1.0


@dataclass
class TrainConfig:
    """The loop."""

    max_iters: int = 20000
    cam_iters: int = 2000  #: classification loss only while the 0-based iteration <= cam_iters (cam_iters + 1 its)
    accum_steps: int = 1  #: micro-batches per process and iteration (gradient accumulation; 1: all at once)
    log_iters: int = 50
    val_iters: int = 2000  #: validate every N iterations (0: only at the end)
    ckpt_iters: int = 1000  #: checkpoint every N iterations (0: only at the end)
    keep_ckpts: int = 3  #: keep the last N checkpoints
    seed: int = 0
    device: str = "auto"  #: auto | cpu | cuda | cuda:N
    amp: str = "off"  #: off (fp32, official) | bf16 (autocast, low-memory option) | auto (bf16 on GPU only)
    compile: bool = False  #: torch.compile the model
    channels_last: bool = False
    cudnn_benchmark: bool = False  #: off for reproducibility
    backend: str = "auto"  #: kernel backend of the fused ops (auto | cuda | triton | cpp | torch)
    reference_style: bool = False  #: the official iteration (benchmark baseline): full-model CAM passes, one VARM
    #: call per image and threshold, torch backends, CRF loss on the host, and the official numerics (fp32, black
    #: padding, field CRF gain, decoder BN updates in CAM passes) whatever the other keys say
    run_dir: str = "runs/tscd"
    tensorboard: bool = True
    image_iters: int = 0  #: log CAM / pseudo-label / prediction images every N iterations (0: at validation)
    checkpointing: str = "off"  #: activation checkpointing: off | encoder (MiT blocks) | all (+ decoder, affinity)
    memory: str = "default"  #: default | low: bf16 autocast, checkpointing all, micro-batches of one image
    #: (gradient accumulation keeps the global batch); see tscd/train/memory.py
    plots: bool = True  #: at the end, write <run_dir>/val_grid.png and curves.png (matplotlib)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))


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
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sec_name, values in data.items():
        if sec_name == "base":
            continue
        if sec_name not in sections:
            raise ConfigError(f"config ({source}): unknown section `{sec_name}`; valid sections: "
                              f"{', '.join(sections)}.{_closest(sec_name, list(sections))}")
        if not isinstance(values, dict):
            raise ConfigError(f"config ({source}): section `{sec_name}` must be a mapping; got {values!r}")
        section = getattr(cfg, sec_name)
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            if key not in hints:
                valid = list(hints)
                raise ConfigError(f"config ({source}): unknown key `{sec_name}.{key}`; valid keys of `{sec_name}`: "
                                  f"{', '.join(valid)}.{_closest(key, valid)}")
            setattr(section, key, _coerce(value, hints[key], f"{sec_name}.{key}"))


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


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"train.max_iters=100"`` -> ("train", "max_iters", 100)."""
    if "=" not in text:
        raise ConfigError(f"config: override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if key.count(".") != 1:
        raise ConfigError(f"config: override key {key!r} must be section.key (e.g. train.max_iters)")
    section, name = key.split(".")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return section, name, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, check: bool = True) -> Config:
    """Defaults <- ``base:`` file <- ``path`` <- ``overrides``, then :func:`validate` (unless ``check`` is False)."""
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
    for text in overrides or []:
        section, name, value = parse_override(text)
        _apply(cfg, {section: {name: value}}, f"override {text!r}")
    if check:
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks of every numeric key (:func:`check_ranges`) and cross-field checks, with clear messages."""
    check_ranges(cfg)
    def choice(where: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ConfigError(f"config: `{where}` must be one of {', '.join(options)}; got {value!r}")

    choice("data.dataset", cfg.data.dataset, ("voc", "coco", "custom", "demo"))
    choice("model.pooling", cfg.model.pooling, ("gmp", "gap"))
    choice("pseudo.refine_mode", cfg.pseudo.refine_mode, ("varm", "par"))
    choice("loss.er_mode", cfg.loss.er_mode, ("off", "grad"))
    choice("train.amp", cfg.train.amp, ("auto", "bf16", "off"))
    choice("train.backend", cfg.train.backend, ("auto", "cuda", "triton", "cpp", "torch"))
    choice("train.checkpointing", cfg.train.checkpointing, ("off", "encoder", "all"))
    choice("train.memory", cfg.train.memory, ("default", "low"))
    choice("loss.crf_gain", cfg.loss.crf_gain, ("field", "exact"))
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

#: The legal range of every numeric config key (tuples: of each element). ``tests/train/test_config.py`` checks that
#: every int / float field of the dataclasses is listed here, so a new key cannot skip validation.
RANGES: dict[str, Range] = {
    "data.crop_size": Range(16),
    "data.scale_range": _POS,
    "data.batch_size": _ONE,
    "data.num_workers": _NONNEG,
    "data.val_num": Range(1, meaning="null validates on every image"),
    "data.demo_num_train": _ONE,
    "data.demo_num_val": _ONE,
    "data.demo_size": Range(16),
    "model.drop_path_rate": Range(0, 1, hi_open=True),
    "model.decoder_dim": _ONE,
    "pseudo.cam_scales": _POS,
    "pseudo.bkg_high": _UNIT,
    "pseudo.bkg_low": _UNIT,
    "pseudo.cam_bkg": _UNIT,
    "pseudo.refine_iters": Range(0, meaning="0 skips the propagation"),
    "pseudo.dilations": _ONE,
    "pseudo.refine_scale": _FRACTION,
    "loss.cls": _NONNEG,
    "loss.seg": _NONNEG,
    "loss.reg": _NONNEG,
    "loss.aff": _NONNEG,
    "loss.scd": _NONNEG,
    "loss.er": _NONNEG,
    "loss.scd_samples": _ONE,
    "loss.scd_scale": _FRACTION,
    "loss.aff_radius": _ONE,
    "loss.crf_sigma_rgb": _POS,
    "loss.crf_sigma_xy": _POS,
    "loss.crf_scale": _FRACTION,
    "optim.lr": _POS,
    "optim.weight_decay": _NONNEG,
    "optim.betas": Range(0, 1, hi_open=True),
    "optim.warmup_iters": Range(0, meaning="0: no warm-up"),
    "optim.warmup_ratio": _UNIT,
    "optim.power": _NONNEG,
    "train.max_iters": _ONE,
    "train.cam_iters": Range(0, meaning="0: no classification-only warm-up"),
    "train.log_iters": _ONE,
    "train.val_iters": Range(0, meaning="0: validate only at the end"),
    "train.ckpt_iters": Range(0, meaning="0: checkpoint only at the end"),
    "train.keep_ckpts": _ONE,
    "train.seed": _NONNEG,
    "train.image_iters": Range(0, meaning="0: log images at validation"),
    # keys being added on other branches (skipped while absent)
    "data.pad_value": Range(0, 255, meaning="RGB on the 0..255 scale"),
    "train.accum_steps": _ONE,
}
#: Tuple keys that must not be empty.
NON_EMPTY: tuple[str, ...] = ("pseudo.cam_scales", "pseudo.dilations")


def check_ranges(cfg: Config) -> None:
    """Check every key of :data:`RANGES` (and :data:`NON_EMPTY`); raises :class:`ConfigError` naming the key, its
    legal range and the bad value. NaN and infinities are rejected everywhere."""
    for where, rng in RANGES.items():
        section, name = where.split(".")
        value = getattr(getattr(cfg, section), name, None)
        if value is None:
            continue
        values = value if isinstance(value, (tuple, list)) else (value,)
        if where in NON_EMPTY and not values:
            raise ConfigError(f"config: `{where}` must not be empty")
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # a name (e.g. data.pad_value: black) is checked where it is resolved
            if not rng.contains(v):
                what = f"every value of `{where}`" if isinstance(value, (tuple, list)) else f"`{where}`"
                hint = f" ({rng.meaning})" if rng.meaning else ""
                raise ConfigError(f"config: {what} must be {rng}{hint}; got {value!r}")


def fit_max_iters(cfg: Config, max_iters: int) -> list[str]:
    """Set ``train.max_iters`` (``tscd train --max-iters N``) and shorten what no longer fits, in proportion.

    ``train.cam_iters`` (the classification-only warm-up) and ``optim.warmup_iters`` (the LR warm-up) larger than
    ``max_iters`` are scaled by ``max_iters / old max_iters`` (so a 20k-iteration config run for 200 iterations
    keeps a 10 % warm-up instead of failing validation). Returns one warning per adjusted key.
    """
    old = cfg.train.max_iters
    cfg.train.max_iters = max_iters
    notes = []
    for section, key in (("train", "cam_iters"), ("optim", "warmup_iters")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if max_iters >= 1 and value > max_iters:
            new = min(max_iters, value * max_iters // max(old, 1))
            setattr(obj, key, new)
            notes.append(f"--max-iters {max_iters}: `{section}.{key}` {value} > {max_iters}; scaled with the run "
                         f"length ({old} -> {max_iters} iterations) to {new}")
    return notes


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
