"""The TSCD training loop (docs/method.md, docs/differences.md): one process, or several with torchrun + DDP.

Batch: ``data.batch_size`` is the GLOBAL batch (official VOC: 2 GPUs x 2 images = 4); each of the W processes
loads batch_size / W images per iteration and splits them into ``train.accum_steps`` micro-batches (gradient
accumulation). The loss of a micro-batch is scaled so that the accumulated gradient equals the gradient of the
whole per-process batch at once (see :meth:`Trainer.train_step`).

Per iteration t (1-based; the official loop counts n = t - 1 from 0):
    n <= cam_iters (cam_iters + 1 iterations): L = L_cls (the other terms are not computed at all; every other
                    trainable parameter gets an exact-zero gradient, as the official ``cls + 0 * seg + ...``,
                    so AdamW counts the step and applies weight decay to it).
    n >  cam_iters: view-1 forward; its multi-scale CAMs (no grad; the decoder runs too, updating its BN
                    statistics as the official CAM passes) -> VARM pseudo labels (both thresholds, one batched
                    call) -> view-2 forward and CAMs -> L = L_cls + w_seg L_seg + w_reg L_reg + w_aff L_aff
                    + w_scd L_scd (+ w_er L_er).
A term whose weight is 0 is not computed. Validation scores with :func:`tscd.eval.evaluator.evaluate` under the
``native`` protocol: the numbers ``tscd eval`` gives by default.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from tscd.config import Config, ConfigError, save_config
from tscd.constants import IGNORE_INDEX
from tscd.data import DataError, build_dataset, build_loader
from tscd.data.transforms import resolve_pad_value
from tscd.errors import CheckpointError
from tscd.method.labels import (
    affinity_label,
    box_mask,
    refine_cams_with_bkg,
    refine_cams_with_bkg_sequential,
    varm_image,
)
from tscd.models import create_model, multi_scale_cam, multi_scale_cam_reference, param_groups
from tscd.train import checkpoint as ckpt
from tscd.train.losses import affinity_loss, cls_loss, equivariance_loss, seg_loss
from tscd.train.memory import resolve_memory_mode
from tscd.train.schedule import build_optimizer

logger = logging.getLogger(__name__)

#: What training validation scores (``tscd eval`` scores these and ``aff`` by default, same protocol).
VAL_OUTPUTS = ("seg", "cam", "pseudo")
#: Iterations the ETA's rate is measured over.
RATE_WINDOW = 50


# ----------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# ----------------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"config: train.device={device_pref!r} but no CUDA GPU is visible here; use "
                          f"train.device=cpu (or auto)")
    if use_cuda:
        index = info.local_rank if world > 1 or ":" not in device_pref else int(device_pref.split(":")[1])
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info, device


def due(iteration: int, every: int, max_iters: int) -> bool:
    """Whether a periodic action (log, validation, checkpoint) runs after ``iteration``: every ``every`` iterations
    and after the last one; ``every == 0`` means only after the last one."""
    return iteration == max_iters or (every > 0 and iteration % every == 0)


class RecentRate:
    """Seconds per iteration over the last ``window`` iterations (the ETA must follow the slower full-loss phase,
    not average it with the warm-up)."""

    def __init__(self, window: int = RATE_WINDOW) -> None:
        self.marks: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def mark(self, iteration: int, now: float | None = None) -> None:
        self.marks.append((time.time() if now is None else now, iteration))

    def seconds_per_iter(self) -> float:
        if len(self.marks) < 2:
            return float("nan")
        (t0, i0), (t1, i1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / max(i1 - i0, 1)

    def eta(self, remaining: int) -> float:
        return self.seconds_per_iter() * remaining


class SkippingSampler(Sampler):
    """Wraps the loader's EpochSampler; the first pass after a resume starts ``skip`` items in."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        keys = list(iter(self.inner))
        skip, self.skip = self.skip, 0
        return iter(keys[skip:])

    def __len__(self) -> int:
        return len(self.inner)


def format_eta(seconds: float) -> str:
    """``3725`` -> ``1:02:05``; days spelled out; ``?`` while unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest // 60 % 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def denormalize01(img: torch.Tensor) -> torch.Tensor:
    """The image VARM sees: ``(img * std + mean).to(uint8) / 255``, as the official code (:func:`varm_image`)."""
    return varm_image(img, truncate=True)


#: Loss terms normalised by counts over the batch (pixels, pairs); the others are means over images.
COUNT_TERMS = ("seg", "aff")


class Trainer:
    """Builds everything from a :class:`~tscd.config.Config` and runs the loop.

    Args:
        cfg: the resolved configuration.
        resume: ``"auto"`` (continue from the newest checkpoint of ``cfg.train.run_dir`` if any),
            ``"never"``, or the path of a checkpoint.
    """

    def __init__(self, cfg: Config, resume: str = "auto") -> None:
        self.cfg = cfg = resolve_memory_mode(cfg)  # train.memory=low sets amp, checkpointing, accum_steps
        self.dist, self.device = init_distributed(cfg.train.device)
        self.run_dir = Path(cfg.train.run_dir)
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        self._official_settings()
        self._build_data()
        self._check_val_masks()
        self._build_model()
        self.iteration = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.epoch_gen_states: dict | None = None
        self.scd_gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed * 1000 + 17 + self.dist.rank)
        self.history: list[dict] = []
        self.writer = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_tmp(self.run_dir)
            save_config(cfg, self.run_dir / "config.yaml")
            if cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self._maybe_resume(resume)

    # -- construction --------------------------------------------------------------------------
    def _official_settings(self) -> None:
        """Resolve the numerics switches; ``train.reference_style`` forces the official value of each."""
        cfg = self.cfg
        amp = (cfg.train.amp == "bf16") or (cfg.train.amp == "auto" and self.device.type == "cuda")
        settings = {"amp": amp, "cam_decoder": cfg.pseudo.cam_decoder, "crf_gain": cfg.loss.crf_gain,
                    "pad_value": cfg.data.pad_value}
        if cfg.train.reference_style:
            official = {"amp": False, "cam_decoder": True, "crf_gain": "field", "pad_value": "black"}
            same = {"pad_value": lambda a, b: resolve_pad_value(a) == resolve_pad_value(b)}
            changed = [f"{k}={settings[k]!r}" for k in official
                       if not same.get(k, lambda a, b: a == b)(settings[k], official[k])]
            if changed and self.dist.is_main:
                logger.warning("train.reference_style: using the official %s instead of %s",
                               ", ".join(f"{k}={v!r}" for k, v in official.items()), ", ".join(changed))
            settings = official
        self.amp = settings["amp"]
        self.cam_decoder = settings["cam_decoder"]
        self.crf_gain = settings["crf_gain"]
        self.pad_value = settings["pad_value"]

    def _dataset(self, split: str, train: bool):
        d = self.cfg.data
        kwargs = {}
        if d.dataset == "demo" and d.root is None:
            kwargs = dict(num_images=d.demo_num_train if train else d.demo_num_val, size=d.demo_size,
                          seed=self.cfg.train.seed)
        return build_dataset(d.dataset, split, d.root, train, d.crop_size if train else None, skip_bad=d.skip_bad,
                             scale_range=d.scale_range, img_pad_value=self.pad_value, **kwargs)

    def _build_data(self) -> None:
        d, world, accum = self.cfg.data, self.dist.world_size, self.cfg.train.accum_steps
        if d.batch_size % world:
            raise ValueError(f"data.batch_size={d.batch_size} is the global batch and must divide evenly across the "
                             f"{world} processes; use a multiple of {world}")
        self.process_batch = d.batch_size // world  #: images per process and iteration
        if self.process_batch % accum:
            raise ValueError(f"train.accum_steps={accum} must divide the per-process batch (data.batch_size="
                             f"{d.batch_size} / {world} processes = {self.process_batch}); use a divisor of "
                             f"{self.process_batch}")
        self.micro_batch = self.process_batch // accum  #: images per forward/backward
        self.train_set = self._dataset(d.train_split, True)
        self.val_set = self._dataset(d.val_split, False)
        self.num_classes = self.train_set.num_classes
        base = build_loader(self.train_set, self.process_batch, shuffle=True, num_workers=d.num_workers,
                            seed=self.cfg.train.seed, drop_last=True, distributed=self.dist.enabled)
        self.sampler = SkippingSampler(base.sampler)
        self.train_loader = DataLoader(base.dataset, batch_size=self.process_batch, sampler=self.sampler,
                                       num_workers=d.num_workers, drop_last=True, pin_memory=base.pin_memory,
                                       worker_init_fn=base.worker_init_fn, generator=base.generator)
        if len(self.train_loader) == 0:
            raise ValueError(f"train split has {len(self.train_set)} images: fewer than one batch of "
                             f"{self.process_batch} per process (data.batch_size={d.batch_size})")

    def _build_model(self) -> None:
        m = self.cfg.model
        model = create_model(m.name, num_classes=self.num_classes, pretrained=m.pretrained, pooling=m.pooling,
                             symmetric_affinity=m.symmetric_affinity, drop_path_rate=m.drop_path_rate,
                             decoder_dim=m.decoder_dim)
        model.to(self.device)
        model.set_checkpointing(self.cfg.train.checkpointing)
        if self.cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.dist.enabled and self.device.type == "cuda":
            # SyncBN needs GPUs; CPU (gloo) runs, used for tests, keep per-process BatchNorm
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        o = self.cfg.optim
        self.optimizer, self.scheduler = build_optimizer(
            param_groups(model, o.lr, o.weight_decay), o.lr, o.betas, o.weight_decay, self.cfg.train.max_iters,
            o.warmup_iters, o.warmup_ratio, o.power)
        self.net = model  # the bare TSCDNet (CAM passes, validation, checkpoints)
        if self.dist.enabled:
            # find_unused_parameters: the warm-up iterations leave the decoder and affinity head unused
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        if self.cfg.train.compile:
            model = torch.compile(model)
        self.model = model

    def _check_val_masks(self) -> None:
        """Decode the masks validation will score now, not after the last iteration (a bad mask must not cost a
        run). With ``data.skip_bad=true`` the bad images are dropped from validation, with a warning."""
        d = self.cfg.data
        total = len(self.val_set) if d.val_num is None else min(d.val_num, len(self.val_set))
        errors = self.val_set.check_masks(range(total))
        if not errors:
            return
        if not d.skip_bad:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise DataError(f"validation split {d.val_split!r}: {errors[0][1]}{more}; fix the masks, or set "
                            f"data.skip_bad=true to leave such images out of validation")
        self.val_set.drop([i for i, _ in errors])
        logger.warning("validation split %r: left out %d image(s) with bad masks: %s", d.val_split, len(errors),
                       "; ".join(msg for _, msg in errors[:5]))

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {**ckpt.rng_state(), "scd_gen": self.scd_gen.get_state()},
            "epoch_gen_states": self.epoch_gen_states,  # shuffle/loader generators as the epoch began
            "history": self.history,
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
        }

    def save(self) -> None:
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.iteration, self.state_dict(), self.cfg.train.keep_ckpts)
            logger.info("checkpoint: %s", path)

    def _maybe_resume(self, resume: str) -> None:
        if resume == "never":
            return
        if resume == "auto":  # the newest checkpoint that loads; corrupt / truncated ones are skipped and named
            found = ckpt.find_resumable(self.run_dir, map_location=self.device, quarantine=self.dist.is_main)
            if found is None:
                return
            path, state = found
        else:
            path = Path(resume)
            state = ckpt.load_checkpoint(path, map_location=self.device)
        if state.get("num_classes") != self.num_classes:
            raise CheckpointError(f"checkpoint {path} has {state.get('num_classes')} classes; the dataset has "
                                  f"{self.num_classes} (another run's checkpoint? use another --run-dir or "
                                  f"--resume never)")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.scd_gen.set_state(state["rng"]["scd_gen"])
        self.iteration, self.epoch = state["iteration"], state["epoch"]
        self.batches_in_epoch = state["batches_in_epoch"]
        self.epoch_gen_states = state["epoch_gen_states"]
        self.history = state.get("history", [])
        logger.info("resumed from %s at iteration %d", path, self.iteration)

    # -- one iteration -------------------------------------------------------------------------
    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batches(self, batch: dict) -> list[dict]:
        """Split the per-process batch into ``train.accum_steps`` equal micro-batches (img, cls_label, img_box)."""
        n = self.cfg.train.accum_steps
        B = batch["img"].shape[0]
        if B % n:
            raise ValueError(f"train_step: a batch of {B} images cannot be split into train.accum_steps={n} "
                             "equal micro-batches")
        size = B // n
        keys = ("img", "cls_label", "img_box")
        return [{k: batch[k][i * size:(i + 1) * size] for k in keys} for i in range(n)]

    def _inputs(self, mb: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = mb["img"].to(self.device, non_blocking=True)
        cls_label = mb["cls_label"].to(self.device, non_blocking=True)
        img_box = mb["img_box"].to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        return img, cls_label, img_box

    def _cams(self, img: torch.Tensor) -> torch.Tensor:
        """Multi-scale CAMs (no grad), in the model's train mode; with ``cam_decoder`` the decoder's BN statistics
        update as in the official full-network CAM passes (one pass per scale, image and flip concatenated)."""
        scales = self.cfg.pseudo.cam_scales
        with torch.no_grad(), self._autocast():
            if self.cfg.train.reference_style:
                return multi_scale_cam_reference(self.net, img, scales).float()
            return multi_scale_cam(self.net, img, scales, decoder=self.cam_decoder).float()

    def _pseudo_labels(self, img: torch.Tensor, cls_label: torch.Tensor, img_box: torch.Tensor) -> dict:
        """View-1 CAMs -> VARM pseudo labels -> affinity labels (no grad, no host sync on the default path)."""
        p, ref_style = self.cfg.pseudo, self.cfg.train.reference_style
        cams = self._cams(img)
        make_pseudo = refine_cams_with_bkg_sequential if ref_style else refine_cams_with_bkg
        pseudo = make_pseudo(varm_image(img), cams, cls_label, img_box, bkg_high=p.bkg_high, bkg_low=p.bkg_low,
                             scale=p.refine_scale, mode=p.refine_mode, num_iter=p.refine_iters,
                             dilations=p.dilations, backend="torch" if ref_style else self.cfg.train.backend)
        labels = {"cams": cams, "pseudo": pseudo}
        if self.cfg.loss.aff:
            H, W = img.shape[-2:]
            labels["aff"] = affinity_label(pseudo, (-(-H // 16), -(-W // 16)), self.cfg.loss.aff_radius)
        return labels

    @staticmethod
    def _count_norms(labels: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Normalisers of the count terms over all micro-batches: (background, foreground) pixels of the pseudo
        labels for seg, (positive, negative) pairs of the affinity labels for aff."""
        pseudo = [lab["pseudo"] for lab in labels]
        norms = {"seg": (sum((p == 0).sum() for p in pseudo),
                         sum(((p != 0) & (p != IGNORE_INDEX)).sum() for p in pseudo))}
        if "aff" in labels[0]:
            norms["aff"] = (sum((lab["aff"] == 1).sum() for lab in labels),
                            sum((lab["aff"] == 0).sum() for lab in labels))
        return norms

    def _micro_terms(self, img: torch.Tensor, cls_label: torch.Tensor, img_box: torch.Tensor, warmup: bool,
                     labels: dict | None, norms: dict | None) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch. ``labels``/``norms`` come from :meth:`_pseudo_labels` and
        :meth:`_count_norms` when several micro-batches are accumulated; otherwise they are computed here, after
        the view-1 forward (the official order of the forward passes)."""
        cfg, L = self.cfg, self.cfg.loss
        ref_style = cfg.train.reference_style
        backend = "torch" if ref_style else cfg.train.backend
        terms: dict[str, torch.Tensor] = {}
        if warmup:
            with self._autocast():
                out = self.model(img, cls_only=True)
            terms["cls"] = cls_loss(out.cls_logits.float(), cls_label)
            return terms
        B, _, H, W = img.shape
        with self._autocast():
            out = self.model(img)
        if labels is None:
            labels = self._pseudo_labels(img, cls_label, img_box)
        cams, pseudo = labels["cams"], labels["pseudo"]
        norms = norms or {}
        terms["cls"] = cls_loss(out.cls_logits.float(), cls_label)
        seg_up = F.interpolate(out.seg_logits.float(), size=(H, W), mode="bilinear", align_corners=True)
        # kept for TensorBoard images only, as copies (a view would keep the whole batch alive)
        self._last = {"img01": varm_image(img[:1]), "cam": cams[:1].clone(), "pseudo": pseudo[:1].clone(),
                      "pred": seg_up[:1].detach().argmax(1)}
        if L.seg:
            terms["seg"] = seg_loss(seg_up, pseudo, counts=norms.get("seg"))
        if L.aff:
            n = out.affinity.shape[-1]
            h16, w16 = out.cam.shape[-2:]
            if h16 * w16 != n or labels["aff"].shape[-1] != n:
                raise RuntimeError(f"train_step: the affinity has {n} positions, the 1/16 grid {h16}x{w16}")
            terms["aff"] = affinity_loss(out.affinity.float(), labels["aff"], counts=norms.get("aff"))
        if L.reg:
            from tscd.kernels import dense_energy_loss

            roi = box_mask(img_box, H, W).float()
            args = (varm_image(img, truncate=False) * 255.0, seg_up.softmax(1), roi, pseudo)
            if ref_style:  # the official code copies everything to the host and runs the C++ lattice there
                args = tuple(a.cpu() for a in args)
            terms["reg"] = dense_energy_loss(*args, sigma_rgb=L.crf_sigma_rgb, sigma_xy=L.crf_sigma_xy,
                                             scale=L.crf_scale, gain=self.crf_gain,
                                             backend="cpp" if ref_style else backend).to(self.device)
        if L.scd or (L.er and L.er_mode == "grad"):
            view2 = F.interpolate(img, scale_factor=L.scd_scale, mode="bilinear", align_corners=True)
            with self._autocast():  # the bare net: DDP sees one forward per backward; grads still sync
                out2 = self.net(view2)
            if L.scd:
                from tscd.kernels import correlation_loss

                t2 = self._cams(view2)
                s2 = F.interpolate(out2.seg_logits.float(), size=t2.shape[-2:], mode="bilinear", align_corners=True)
                terms["scd"] = correlation_loss(cams, t2, seg_up, s2, num_samples=L.scd_samples,
                                                generator=self.scd_gen, backend=backend)
            if L.er and L.er_mode == "grad":
                terms["er"] = equivariance_loss(out.cam.float(), out2.cam.float())
        return terms

    def _zero_missing_grads(self) -> None:
        """Exact-zero gradients for every trainable parameter that received none (the warm-up's decoder and
        affinity head): the official ``cls + 0 * seg + 0 * aff`` gives them zeros, so AdamW counts the step
        (its bias corrections advance) and applies weight decay; a ``None`` gradient would make AdamW skip them."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on this process's batch (``data.batch_size / world_size`` images).

        Gradient accumulation (``train.accum_steps`` = n): the batch is split into n equal micro-batches, each
        runs forward and backward, and its loss is scaled so that the accumulated gradient is the gradient of the
        whole batch at once: the terms that are means over images (cls, reg, scd, er) by (micro-batch / batch),
        the count-normalised terms (seg over labelled pixels, aff over labelled pairs) by dividing by the counts of
        the whole batch, for which the pseudo labels of all micro-batches are computed first (no grad). What
        accumulation cannot reproduce: BatchNorm batch statistics (per micro-batch) and the SCD loss's batch-wide
        centring mean (per micro-batch); with n = 1 neither arises. Under DDP the gradients are all-reduced once,
        after the last micro-batch.

        Returns:
            The loss terms of the whole batch (floats) and ``total``.
        """
        cfg = self.cfg
        warmup = self.iteration <= cfg.train.cam_iters + 1  # the official 0-based n = t - 1 <= cam_iters
        weights = {"cls": cfg.loss.cls, "seg": cfg.loss.seg, "aff": cfg.loss.aff, "reg": cfg.loss.reg,
                   "scd": cfg.loss.scd, "er": cfg.loss.er}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = [self._inputs(mb) for mb in self._micro_batches(batch)]
        n = len(micro)
        total_images = sum(img.shape[0] for img, _, _ in micro)
        labels: list[dict | None] = [None] * n
        norms = None
        if n > 1 and not warmup:  # count normalisers of the whole batch before any backward
            labels = [self._pseudo_labels(*mb) for mb in micro]
            norms = self._count_norms(labels)
        sums: dict[str, torch.Tensor] = {}
        for i, (mb, lab) in enumerate(zip(micro, labels)):
            frac = mb[0].shape[0] / total_images
            last = i == n - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync()
            with sync:
                terms = self._micro_terms(*mb, warmup, lab, norms)
                scaled = {k: v * (1.0 if (norms is not None and k in COUNT_TERMS) else frac) for k, v in terms.items()}
                loss = sum(weights[k] * v for k, v in scaled.items())
                loss.backward()
            for k, v in scaled.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()
            labels[i] = None  # free this micro-batch's labels
        self._zero_missing_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # no gradients alive between iterations (memory)
        self.scheduler.step()
        names = list(sums)
        floats = torch.stack([sums[k].float() for k in names]).tolist()  # one host transfer for all terms
        values = dict(zip(names, floats))
        values["total"] = sum(weights[k] * values[k] for k in names)
        if not math.isfinite(values["total"]):
            raise FloatingPointError(f"loss is {values['total']} at iteration {self.iteration}: {values}")
        return values

    # -- the loop ------------------------------------------------------------------------------
    def _generators(self) -> list[torch.Generator]:
        inner = getattr(self.sampler.inner, "sampler", None)
        gens = [getattr(inner, "generator", None), self.train_loader.generator]
        return [g for g in gens if g is not None]

    def _batches(self):
        resumed = self.epoch_gen_states is not None
        if resumed:  # replay the interrupted epoch's order, minus the batches already used
            for g, st in zip(self._generators(), self.epoch_gen_states):
                g.set_state(st)
            self.sampler.skip = self.batches_in_epoch * self.process_batch
        while True:
            if not resumed:
                self.epoch_gen_states = [g.get_state() for g in self._generators()]
            resumed = False
            self.sampler.set_epoch(self.epoch)
            for batch in self.train_loader:
                self.batches_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batches_in_epoch = 0

    def train(self) -> dict:
        """Run until ``max_iters``; returns the final validation scores."""
        cfg = self.cfg.train
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_iters, initial=self.iteration, disable=not self.dist.is_main or None,
                   desc="train", dynamic_ncols=True)
        self.rate = RecentRate()
        self.rate.mark(self.iteration)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        batches = self._batches()
        scores = {}
        while self.iteration < cfg.max_iters:
            batch = next(batches)
            self.iteration += 1
            values = self.train_step(batch)
            values["lr"] = self.optimizer.param_groups[0]["lr"]
            self.rate.mark(self.iteration)
            self.history.append({"iteration": self.iteration, **values})
            bar.update(1)
            bar.set_postfix(loss=f"{values['total']:.4f}", lr=f"{values['lr']:.2e}")
            if due(self.iteration, cfg.log_iters, cfg.max_iters):
                self._log(values)
            if cfg.val_iters and self.iteration % cfg.val_iters == 0 and self.iteration < cfg.max_iters:
                scores = self.validate()  # the last one runs after the loop
            if due(self.iteration, cfg.ckpt_iters, cfg.max_iters):
                self.save()
        bar.close()
        scores = self.validate()
        if self.dist.is_main:
            (self.run_dir / "final_scores.json").write_text(json.dumps(scores, indent=2))
            if cfg.plots:  # val_grid.png + curves.png (tscd.train.visualize)
                from tscd.train.visualize import write_run_pictures

                self.pictures = write_run_pictures(self)
        return scores

    def _log(self, values: dict) -> None:
        """One log line: losses, the recent speed, the peak GPU memory (CUDA only: the CPU allocator keeps no
        peak) and the ETA at the recent speed."""
        if not self.dist.is_main:
            return
        rate = getattr(self, "rate", None) or RecentRate()
        spi = rate.seconds_per_iter()
        eta = rate.eta(self.cfg.train.max_iters - self.iteration)
        mem = ""
        if self.device.type == "cuda":
            mem = f", peak {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
        parts = " ".join(f"{k}={v:.4f}" for k, v in values.items() if k not in ("lr",))
        logger.info("iter %d/%d lr=%.3e %s | %.3f s/it%s, ETA %s", self.iteration, self.cfg.train.max_iters,
                    values["lr"], parts, spi, mem, format_eta(eta))
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, self.iteration)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict:
        """mIoU of the segmentation head, the CAM label and the VARM pseudo labels on the val split, scored by
        :func:`tscd.eval.evaluator.evaluate` with the ``native`` protocol (what ``tscd eval`` reports by default)."""
        from tscd.eval.evaluator import evaluate, protocol_settings  # lazy: keeps importing tscd.train light

        settings = protocol_settings("native", self.cfg, self.device, self.cfg.data.val_split, outputs=VAL_OUTPUTS,
                                     num_images=self.cfg.data.val_num)
        settings.amp = self.amp
        try:
            report = evaluate(self.net, self.val_set, settings, self.device, progress=False)
        finally:
            self.model.train()
        scores = report["results"]
        if self.dist.is_main:
            logger.info("val @%d (%d images, protocol %s): mIoU seg %.2f | CAM %.2f | pseudo label %.2f",
                        self.iteration, report["num_images"], report["protocol"], scores["seg"]["miou"],
                        scores["cam"]["miou"], scores["pseudo"]["miou"])
            if self.writer is not None:
                for k in scores:
                    self.writer.add_scalar(f"val/miou_{k}", scores[k]["miou"], self.iteration)
                self._log_images()
        return scores

    def _log_images(self) -> None:
        last = getattr(self, "_last", None)
        if not last:
            return
        palette = torch.tensor(self.val_set.palette[:768], dtype=torch.uint8).view(-1, 3)

        def colour(label: torch.Tensor) -> torch.Tensor:
            return palette[label[0].cpu().clamp(max=255).long()].permute(2, 0, 1)

        self.writer.add_image("train/image", last["img01"][0].cpu(), self.iteration)
        self.writer.add_image("train/cam_max", last["cam"][0].max(0, keepdim=True)[0].cpu(), self.iteration)
        self.writer.add_image("train/pseudo_label", colour(last["pseudo"]), self.iteration)
        if "pred" in last:
            self.writer.add_image("train/prediction", colour(last["pred"]), self.iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
