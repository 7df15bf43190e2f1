"""The one evaluator: training-time validation and ``tscd eval`` both score with :func:`evaluate` (docs/method.md).

Evaluated outputs (keys of the results), each against the dataset's masks (255 ignored):

==============  ===========================================================================================
``seg``         segmentation head, single scale (the test image, no flip)
``seg_ms``      segmentation head, multi-scale + flip (:func:`~tscd.eval.inference.forward_multi_scale`)
``seg_ms_crf``  ``seg_ms`` followed by the dense CRF (:mod:`tscd.eval.crf`)
``cam``         CAM label: multi-scale CAM, argmax over the image's classes, background where <= ``cam_bkg``
``aff``         affinity-refined CAM (random walk, :mod:`tscd.method.random_walk`, background 0.35)
``pseudo``      the training pseudo labels (VARM or PAR, :func:`tscd.method.refine_cams_with_bkg`);
                their uncertain pixels (255) are scored as background, as in training-time validation
==============  ===========================================================================================

``cam``, ``aff`` and ``pseudo`` use the image-level labels of the dataset (the weak supervision), as is standard.

Protocols (:data:`PROTOCOLS`, :func:`protocol_settings`) fix how the test image is presented:

* ``native`` (the default of ``tscd eval``, and what training validation logs): every image at its native size;
  ``seg`` single scale; the CAM at ``pseudo.cam_scales`` with flip; bf16 autocast when the run trained with it
  (the resolved ``train.amp``).
* ``ms`` (the field's multi-scale test, AFA's ``test_msc_flip``): the long side resized to 512, ``seg_ms`` at scales
  1, 0.5, 0.75 with flip (max over scales), optionally + dense CRF (``seg_ms_crf``); float32.

Every output is upsampled bilinearly to the mask's size before the argmax; ``pseudo`` refines the upsampled CAM on
the native image. Consecutive images of one size are scored together (``batch_size``). Under ``torch.distributed``
every rank takes every world_size-th image and the confusion matrices are summed over ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from tscd.constants import EVAL_PROTOCOLS, IGNORE_INDEX
from tscd.data import denormalize
from tscd.eval.crf import CRFParams, CRFRunner
from tscd.eval.inference import DEFAULT_RESIZE_LONG, DEFAULT_SEG_SCALES, forward_multi_scale, resize_long
from tscd.eval.metrics import ConfusionMatrix
from tscd.eval.outputs import save_mask
from tscd.method.labels import cam_to_label, refine_cams_with_bkg
from tscd.method.random_walk import RW_BKG, RW_POWER, RW_RADIUS, affinity_cam_label
from tscd.models.tscd_net import _unwrap

logger = logging.getLogger(__name__)

#: Every output :func:`evaluate` can score, in table order.
OUTPUTS: tuple[str, ...] = ("seg", "seg_ms", "seg_ms_crf", "cam", "aff", "pseudo")
#: Column titles of the results table.
OUTPUT_TITLES: dict[str, str] = {"seg": "seg", "seg_ms": "seg MS+flip", "seg_ms_crf": "seg MS+flip+CRF",
                                 "cam": "CAM", "aff": "CAM+aff RW", "pseudo": "pseudo label"}
#: Evaluation protocols (module docstring): name -> description.
PROTOCOLS: dict[str, str] = EVAL_PROTOCOLS
#: Images of one size scored together by the ``native`` protocol.
NATIVE_BATCH = 16


@dataclass
class EvalSettings:
    """What :func:`evaluate` computes and how (defaults: the ``ms`` protocol; see :func:`protocol_settings`).

    Attributes:
        protocol: name of the protocol these settings implement (reported with the numbers); ``custom`` if built
            by hand, ``<name>+custom`` if a protocol's settings were changed.
        outputs: which of :data:`OUTPUTS` to score.
        seg_scales: multi-scale test scales of the segmentation head (AFA: 1, 0.5, 0.75).
        cam_scales: CAM scales (training config's ``pseudo.cam_scales``: 1, 0.5, 1.5).
        flip: horizontal flip in the multi-scale passes.
        resize_long: long side of the test image (512); 0 or None keeps the native size.
        cam_bkg: background threshold of the CAM label (0.45).
        rw_bkg, rw_radius, rw_power: random walk (0.35, 8, 2).
        crf: CRF settings; crf_workers threads for CPU CRF jobs.
        pseudo: keyword arguments of ``refine_cams_with_bkg`` (bkg_high, bkg_low, scale, mode, num_iter,
            dilations, backend).
        pred_dir: if set, write palette PNGs of ``save_outputs`` to ``pred_dir/<output>/<name>.png``.
        save_outputs: outputs to write (default: all evaluated ones).
        save_logits: also write the (multi-scale if computed) 1/4-resolution logits as float16
            ``pred_dir/logits/<name>.pt`` (off by default: they are large on COCO).
        num_images: evaluate the first N images only.
        batch_size: consecutive images of one size scored together (results equal up to float rounding).
        amp: run the model under bf16 autocast.
    """

    protocol: str = "custom"
    outputs: Sequence[str] = ("seg", "seg_ms", "cam", "aff")
    seg_scales: Sequence[float] = DEFAULT_SEG_SCALES
    cam_scales: Sequence[float] = (1.0, 0.5, 1.5)
    flip: bool = True
    resize_long: int | None = DEFAULT_RESIZE_LONG
    cam_bkg: float = 0.45
    rw_bkg: float = RW_BKG
    rw_radius: int = RW_RADIUS
    rw_power: float = RW_POWER
    crf: CRFParams = field(default_factory=CRFParams)
    crf_workers: int = 2
    crf_backend: str = "auto"
    pseudo: dict = field(default_factory=dict)
    pred_dir: str | os.PathLike | None = None
    save_outputs: Sequence[str] | None = None
    save_logits: bool = False
    num_images: int | None = None
    batch_size: int = 1
    amp: bool = False

    def describe(self) -> dict:
        """The settings as plain values, for result files."""
        return {"protocol": self.protocol, "outputs": list(self.outputs), "seg_scales": list(self.seg_scales),
                "cam_scales": list(self.cam_scales), "flip": self.flip, "resize_long": self.resize_long or None,
                "cam_bkg": self.cam_bkg, "amp": "bf16" if self.amp else "off",
                "random_walk": {"bkg": self.rw_bkg, "radius": self.rw_radius, "power": self.rw_power},
                "crf": dataclasses.asdict(self.crf) if "seg_ms_crf" in self.outputs else None}

    def check(self) -> None:
        """Raises ValueError naming the bad setting."""
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown or not self.outputs:
            raise ValueError(f"evaluate: `outputs` must be a non-empty subset of {list(OUTPUTS)}; got "
                             f"{list(self.outputs)}")
        for name in ("seg_scales", "cam_scales"):
            scales = getattr(self, name)
            if not scales or any(float(s) <= 0 for s in scales):
                raise ValueError(f"evaluate: `{name}` must be a non-empty list of positive numbers; got "
                                 f"{list(scales)}")
        if self.resize_long is not None and self.resize_long < 0:
            raise ValueError(f"evaluate: `resize_long` must be >= 0; got {self.resize_long}")
        if self.batch_size < 1:
            raise ValueError(f"evaluate: `batch_size` must be >= 1; got {self.batch_size}")
        if self.num_images is not None and self.num_images < 1:
            raise ValueError(f"evaluate: `num_images` must be >= 1; got {self.num_images}")


def protocol_settings(protocol: str, cfg, device: torch.device | str = "cpu", split: str = "val",
                      **changes) -> EvalSettings:
    """The :class:`EvalSettings` of a named protocol (:data:`PROTOCOLS`) for a training config.

    Args:
        protocol: ``native`` or ``ms``.
        cfg: the :class:`tscd.config.Config` of the run, resolved (:func:`tscd.config.resolve_config`; CAM scales,
            thresholds, refinement settings, ``train.amp``).
        device: where the model runs (``native`` runs under bf16 autocast when the run trained with it:
            ``train.amp: bf16``).
        split: the split scored; default outputs add ``pseudo`` on training splits under ``ms``.
        **changes: fields to set on top (``outputs``, ``num_images``, ...). Changing one of the fields that define
            the protocol (``seg_scales``, ``cam_scales``, ``flip``, ``resize_long``, ``amp``) to another value
            names the result ``<protocol>+custom``.

    Raises:
        ValueError: unknown protocol or field, or an unresolved ``train.amp: auto``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate: unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)} (`--protocol`)")
    device = torch.device(device)
    p = cfg.pseudo
    base = dict(protocol=protocol, cam_scales=tuple(p.cam_scales), cam_bkg=p.cam_bkg, flip=True,
                pseudo=dict(bkg_high=p.bkg_high, bkg_low=p.bkg_low, scale=p.refine_scale, mode=p.refine_mode,
                            num_iter=p.refine_iters, dilations=tuple(p.dilations), backend=cfg.train.backend))
    if protocol == "native":
        if cfg.train.amp == "auto":
            raise ValueError("protocol_settings: `cfg` is not resolved (train.amp is 'auto'); resolve it for the "
                             "device first with tscd.config.resolve_config")
        amp = cfg.train.amp == "bf16"
        base.update(outputs=("seg", "cam", "aff", "pseudo"), seg_scales=DEFAULT_SEG_SCALES, resize_long=None,
                    batch_size=NATIVE_BATCH, amp=amp)
    else:
        outputs = ("seg", "seg_ms", "cam", "aff") + (("pseudo",) if split.startswith("train") else ())
        base.update(outputs=outputs, seg_scales=DEFAULT_SEG_SCALES, resize_long=DEFAULT_RESIZE_LONG, batch_size=1,
                    amp=False)
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ValueError(f"protocol_settings: unknown setting(s) {unknown}")
    defining = ("seg_scales", "cam_scales", "flip", "resize_long", "amp")

    def norm(v):
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (v or None)

    if any(k in changes and norm(changes[k]) != norm(base[k]) for k in defining):
        base["protocol"] = f"{protocol}+custom"
    base.update(changes)
    return EvalSettings(**base)


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _image255(img: Tensor) -> Tensor:
    """Normalised (B, 3, H, W) -> float image on the 0..255 scale (rounded: the original uint8 values)."""
    return (denormalize(img.float()) * 255).round()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: torch.utils.data.Dataset, settings: EvalSettings,
             device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Score ``model`` on ``dataset`` (native-size items with ``label``), see the module docstring.

    Args:
        model: a :class:`~tscd.models.TSCDNet` or ToCo's network (put in eval mode here; a network without an
            affinity head skips the ``aff`` output).
        dataset: an evaluation dataset (``build_dataset(..., train=False)``) whose items have ``label``.
        settings: :class:`EvalSettings`.
        device: where to run.
        progress: show a tqdm bar (quiet when not a TTY).

    Returns:
        ``{"num_images": n, "protocol": name, "results": {output: segmentation_scores}}`` (scores in %, from
        :func:`tscd.eval.metrics.segmentation_scores`).

    Raises:
        ValueError: bad settings, or an item without a mask (names the image).
        RuntimeError: ``seg_ms_crf`` asked for but the dense CRF is not available.
    """
    settings.check()
    device = torch.device(device)
    outputs = [o for o in OUTPUTS if o in settings.outputs]
    if "aff" in outputs and getattr(_unwrap(model, "evaluate"), "affinity_head", None) is None:
        logger.info("evaluate: the network has no affinity head (ToCo's ViT): output 'aff' skipped")
        outputs.remove("aff")
    names = list(getattr(dataset, "class_names", [])) or None
    num_classes = int(getattr(dataset, "num_classes"))
    mats = {o: ConfusionMatrix(num_classes + 1, device) for o in outputs}
    crf = CRFRunner(settings.crf, settings.crf_workers, settings.crf_backend) if "seg_ms_crf" in outputs else None
    pred_dir = Path(settings.pred_dir) if settings.pred_dir is not None else None
    save = set(settings.save_outputs if settings.save_outputs is not None else outputs) if pred_dir else set()
    need_ms = "seg_ms" in outputs or "seg_ms_crf" in outputs
    need_cam = any(o in outputs for o in ("cam", "aff", "pseudo"))
    model.eval()
    rank, world = rank_and_world()
    total = len(dataset) if settings.num_images is None else min(settings.num_images, len(dataset))
    indices = range(rank, total, world)

    def autocast():
        if settings.amp:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def record(output: str, pred: Tensor, label: Tensor, batch_names: list[str]) -> None:
        mats[output].update(pred, label)
        if output in save:
            for k, name in enumerate(batch_names):
                save_mask(pred[k].to(torch.uint8).cpu().numpy(), pred_dir / output / f"{name}.png")

    def score(items: list[dict]) -> None:
        batch_names = [it["name"] for it in items]
        img = torch.stack([it["img"] for it in items]).to(device, non_blocking=True)
        label = torch.stack([it["label"] for it in items]).to(device, non_blocking=True)
        cls_label = torch.stack([it["cls_label"] for it in items]).to(device, non_blocking=True)
        size = tuple(label.shape[-2:])
        x = resize_long(img, settings.resize_long)
        with autocast():
            out = forward_multi_scale(model, x, seg_scales=settings.seg_scales if need_ms else None,
                                      cam_scales=settings.cam_scales if need_cam else None, flip=settings.flip)

        def up(t: Tensor) -> Tensor:
            t = t.float()
            return t if tuple(t.shape[-2:]) == size else F.interpolate(t, size=size, mode="bilinear",
                                                                        align_corners=False)

        if "seg" in outputs:
            record("seg", up(out.seg_logits).argmax(1), label, batch_names)
        if need_ms:
            ms = up(out.seg_ms)
            if "seg_ms" in outputs:
                record("seg_ms", ms.argmax(1), label, batch_names)
            if crf is not None:
                for k, name in enumerate(batch_names):
                    crf.submit(_image255(img[k:k + 1]), ms[k:k + 1].softmax(1),
                               lambda p, lab=label[k:k + 1], name=name: record("seg_ms_crf", p.argmax(1), lab, [name]))
        if pred_dir is not None and settings.save_logits:
            logits = out.seg_ms if out.seg_ms is not None else out.seg_logits
            for k, name in enumerate(batch_names):
                path = pred_dir / "logits" / f"{name}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(logits[k].half().cpu(), path)
        if need_cam:
            cam_full = up(out.cam)
            if "cam" in outputs:
                record("cam", cam_to_label(cam_full, cls_label, settings.cam_bkg), label, batch_names)
            if "aff" in outputs:
                record("aff", affinity_cam_label(out.cam.float(), out.affinity.float(), cls_label, size,
                                                 bkg=settings.rw_bkg, radius=settings.rw_radius,
                                                 power=settings.rw_power), label, batch_names)
            if "pseudo" in outputs:
                pseudo = refine_cams_with_bkg(denormalize(img.float()), cam_full, cls_label, None, **settings.pseudo)
                record("pseudo", pseudo.masked_fill(pseudo == IGNORE_INDEX, 0), label, batch_names)

    try:
        pending: list[dict] = []
        for i in tqdm(indices, desc="eval", disable=None if progress else True, dynamic_ncols=True):
            item = dataset[i]
            item.setdefault("name", str(i))
            if item.get("label") is None:
                raise ValueError(f"evaluate: image {item['name']!r} (item {i}) has no mask; evaluation needs masks")
            if pending and (item["img"].shape != pending[0]["img"].shape or len(pending) == settings.batch_size):
                score(pending)
                pending = []
            pending.append(item)
        if pending:
            score(pending)
        if crf is not None:
            crf.close()
            crf = None
    finally:
        if crf is not None and crf.pool is not None:  # an error above: drop queued CRF jobs
            crf.pool.shutdown(wait=False, cancel_futures=True)
    results = {}
    for o in outputs:
        mats[o].all_reduce()
        results[o] = mats[o].scores(names)
    return {"num_images": total, "protocol": settings.protocol, "results": results}


def build_eval_dataset(cfg, split: str, dataset: str | None = None, root: str | os.PathLike | None = None,
                       num_classes: int | None = None) -> torch.utils.data.Dataset:
    """The evaluation dataset (native size, no augmentation) of a training config, for ``split``.

    Args:
        cfg: a :class:`tscd.config.Config` (usually the checkpoint's); ``data.dataset``, ``data.root`` and the demo
            settings are used unless ``dataset`` / ``root`` override them.
        split: split name (``val``, ``train``, ``train_aug``, ...).
        dataset: dataset name override.
        root: dataset root override.
        num_classes: if given, the dataset must have this many foreground classes.

    Raises:
        ValueError, FileNotFoundError, DataError: unknown split or dataset, missing files, class-count mismatch;
            messages name ``--split`` / ``--dataset`` / ``--root``.
    """
    from tscd.data import build_dataset

    d = cfg.data
    name = dataset or d.dataset
    root = root if root is not None else (d.root if dataset is None or dataset == d.dataset else None)
    kwargs = {}
    if name == "demo" and root is None:
        kwargs = dict(num_images=d.demo_num_val if split == "val" else d.demo_num_train, size=d.demo_size,
                      seed=cfg.train.seed)
    try:
        ds = build_dataset(name, split, root, False, **kwargs)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"cannot load split {split!r} of dataset {name!r} (root {root}) (check --split, --dataset, "
                        f"--root): {err}") from None
    if num_classes is not None and ds.num_classes != num_classes:
        raise ValueError(f"the checkpoint was trained with {num_classes} foreground classes, but dataset {name!r} "
                         f"split {split!r} has {ds.num_classes} ({', '.join(ds.class_names[1:6])}, ...); evaluate it "
                         f"on the dataset it was trained on (--dataset / --root)")
    return ds
