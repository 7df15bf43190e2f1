"""The training loop: one process, or several with torchrun + DDP. What an iteration computes (pseudo labels, loss
terms, their weights and warm-up) is the recipe's (``recipe:`` in the config, :mod:`tscd.method.recipes`); the
trainer owns data, micro-batches and gradient accumulation, DDP, optimizer and schedule, checkpoints and resume,
logging and validation (``native`` protocol, appended to ``<run_dir>/metrics.jsonl``).

``data.batch_size`` is the GLOBAL batch (official VOC: 2 GPUs x 2 images = 4); each of the W processes loads
batch_size / W images per iteration, split into ``train.accum_steps`` micro-batches (:meth:`Trainer.train_step`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function

from tscd.config import Config, resolve_config, save_config
from tscd.data import build_dataset, build_loader
from tscd.data.loader import ResumableLoader
from tscd.eval.metrics import append_metrics
from tscd.method.recipes import Batch, Recipe, RecipeContext, get_recipe
from tscd.models import compile_module
from tscd.train import checkpoint as ckpt
from tscd.train.distributed import (  # noqa: F401  (DistInfo: tests replace the set-up)
    DistInfo,
    close_distributed,
    init_distributed,
)
from tscd.train.host_memory import apply_host_memory
from tscd.train.progress import RecentRate, due, format_eta
from tscd.train.schedule import build_optimizer

logger = logging.getLogger(__name__)

#: What training validation scores (``tscd eval`` scores these and ``aff`` by default, same protocol).
VAL_OUTPUTS = ("seg", "cam", "pseudo")


class _Step(nn.Module):
    """What DDP wraps: the network and the recipe, one forward (the recipe's terms) per micro-batch, so that DDP
    sees every parameter a term used (both views, the recipe's own modules)."""

    def __init__(self, net: nn.Module, recipe: Recipe) -> None:
        super().__init__()
        self.net, self.recipe = net, recipe

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.recipe.terms(*args, **kwargs)


class Trainer:
    """Builds everything from a :class:`~tscd.config.Config` and runs the loop.

    Args:
        cfg: the configuration as loaded; :func:`tscd.config.resolve_config` makes it the one that runs (saved as
            ``<run_dir>/config.yaml``).
        resume: ``"auto"`` (continue from the newest checkpoint of ``cfg.train.run_dir`` if any),
            ``"never"``, or the path of a checkpoint.
        max_iters: ``tscd train --max-iters``: the run length (warm-ups that do not fit are scaled).
    """

    def __init__(self, cfg: Config, resume: str = "auto", max_iters: int | None = None) -> None:
        self.dist, self.device = init_distributed(cfg.train.device)
        self.cfg, self.changes = resolve_config(cfg, self.device, self.dist.world_size, max_iters)
        cfg = self.cfg
        self.run_dir = Path(cfg.train.run_dir)
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        apply_host_memory(cfg.train.host_memory, self.device)
        torch.manual_seed(cfg.train.seed + self.dist.rank)
        self._build_data()
        self.val_set.check_eval_masks(cfg.data.val_num, cfg.data.skip_bad, f"validation split {cfg.data.val_split!r}")
        self._build_model()
        self.iteration = 0
        self.history: list[dict] = []
        self.writer = None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_tmp(self.run_dir)
            save_config(cfg, self.run_dir / "config.yaml", self.changes)
            if cfg.train.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
        self._maybe_resume(resume)

    # the resolved numerics (kept as attributes of the trainer for the tests and benchmarks that read them)
    amp = property(lambda self: self.cfg.train.amp == "bf16")
    cam_decoder = property(lambda self: self.cfg.pseudo.cam_decoder)
    crf_gain = property(lambda self: self.cfg.loss.crf_gain)
    pad_value = property(lambda self: self.cfg.data.pad_value)

    # -- construction --------------------------------------------------------------------------
    def _dataset(self, split: str, train: bool):
        d = self.cfg.data
        kwargs = {}
        if d.dataset == "demo" and d.root is None:
            kwargs = dict(num_images=d.demo_num_train if train else d.demo_num_val, size=d.demo_size,
                          seed=self.cfg.train.seed)
        views = get_recipe(self.cfg.recipe).views if train else None  # a recipe's extra views (ToCo's)
        return build_dataset(d.dataset, split, d.root, train, d.crop_size if train else None, skip_bad=d.skip_bad,
                             scale_range=d.scale_range, img_pad_value=d.pad_value, views=views, **kwargs)

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
        self.batches = ResumableLoader(build_loader(self.train_set, self.process_batch, shuffle=True,
                                                    num_workers=d.num_workers, seed=self.cfg.train.seed,
                                                    drop_last=True, distributed=self.dist.enabled))
        self.train_loader = self.batches.loader
        if len(self.train_loader) == 0:
            raise ValueError(f"train split has {len(self.train_set)} images: fewer than one batch of "
                             f"{self.process_batch} per process (data.batch_size={d.batch_size})")

    def _build_model(self) -> None:
        """The network, the recipe (and its modules), the optimizer and schedule, and the DDP wrapper."""
        t, o = self.cfg.train, self.cfg.optim
        recipe = get_recipe(self.cfg.recipe)
        net = recipe.build_network(self.cfg, self.num_classes)
        net.to(self.device)
        net.set_checkpointing(t.checkpointing)
        if t.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.dist.enabled and self.device.type == "cuda":
            # SyncBN needs GPUs; CPU (gloo) runs, used for tests, keep per-process BatchNorm
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        self.net = net  # the bare network (CAM passes, validation, checkpoints)
        ctx = RecipeContext(net, compile_module(net) if t.compile in ("forward", "all") else net, self.device,
                            t.amp == "bf16", self.dist.rank, self.dist.world_size,
                            compile_cams=t.compile in ("cams", "all"))
        self.recipe = recipe(self.cfg, ctx).to(self.device)
        self.optimizer, self.scheduler = build_optimizer(self.recipe.param_groups(o.lr, o.weight_decay), o.lr, o.betas,
                                                         o.weight_decay, t.max_iters, o.warmup_iters, o.warmup_ratio,
                                                         o.power)
        self.step_terms = self.recipe.terms
        self.ddp = None
        if self.dist.enabled:
            # find_unused_parameters: the warm-up iterations leave the decoder and affinity head unused
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                _Step(net, self.recipe), device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
            self.step_terms = self.ddp

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "iteration": self.iteration,
            **self.batches.state_dict(),  # epoch, batches in it, shuffle generators as it began
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {**ckpt.rng_state(), **self.recipe.rng_state()},
            "history": self.history,
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
        }
        if self.recipe.state_dict():
            state["recipe"] = self.recipe.state_dict()
        return state

    def save(self) -> None:
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.run_dir, self.iteration, self.state_dict(), self.cfg.train.keep_ckpts)
            logger.info("checkpoint: %s", path)

    def _maybe_resume(self, resume: str) -> None:
        found = ckpt.resume_from(self.run_dir, resume, self.num_classes, self.cfg.recipe, map_location=self.device,
                                 quarantine=self.dist.is_main)
        if found is None:
            return
        path, state = found
        self.net.load_state_dict(state["model"])
        self.recipe.load_state_dict(state.get("recipe", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint saves the groups' settings: keep build_optimizer's
            group["foreach"] = self.optimizer.defaults["foreach"]  # (older checkpoints: None; the same numbers)
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.recipe.set_rng_state(state["rng"])
        self.batches.load_state_dict(state)
        self.iteration = state["iteration"]
        self.history = state.get("history", [])
        logger.info("resumed from %s at iteration %d", path, self.iteration)

    def trained_modules(self) -> torch.nn.Module:
        """Everything the run trains and keeps: the network and the recipe's own modules (ToCo's projection heads
        and their teacher), as one module (parameters counted once)."""
        return torch.nn.ModuleList([self.net, self.recipe])

    # -- one iteration -------------------------------------------------------------------------
    def _micro_batches(self, batch: dict) -> list[Batch]:
        """This process's batch as ``train.accum_steps`` equal micro-batches on the device."""
        n = self.cfg.train.accum_steps
        B = batch["img"].shape[0]
        if B % n:
            raise ValueError(f"train_step: a batch of {B} images cannot be split into train.accum_steps={n} "
                             "equal micro-batches")
        size = B // n
        out = []
        for i in range(n):
            img, cls_label, img_box = (batch[k][i * size:(i + 1) * size].to(self.device, non_blocking=True)
                                       for k in ("img", "cls_label", "img_box"))
            views = {k: v[i * size:(i + 1) * size].to(self.device, non_blocking=True)
                     for k, v in batch["views"].items()} if "views" in batch else None
            if self.cfg.train.channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            out.append(Batch(img, cls_label, img_box, views))
        return out

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

        Gradient accumulation (``train.accum_steps`` = n micro-batches): the recipe's terms that are means over
        images are scaled by (micro-batch / batch), its count terms divided by the counts of the whole batch (the
        labels of all micro-batches are made first, no grad), so the accumulated gradient is that of the whole
        batch, up to BatchNorm statistics and batch-wide means inside a term (docs/differences.md). Under DDP the
        gradients are all-reduced once, after the last micro-batch.

        Returns:
            The loss terms of the whole batch (floats) and ``total``.
        """
        recipe, it = self.recipe, self.iteration
        weights = recipe.loss_weights
        self.net.train()
        recipe.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = self._micro_batches(batch)
        n = len(micro)
        total_images = sum(mb.img.shape[0] for mb in micro)
        labels: list[dict | None] = [None] * n
        norms = None
        if n > 1:  # count normalisers of the whole batch before any backward
            with record_function("tscd/labels"):
                labels = [recipe.labels(mb, it) for mb in micro]
            norms = recipe.count_norms(labels) if labels[0] is not None else None
        sums: dict[str, torch.Tensor] = {}
        for i, (mb, lab) in enumerate(zip(micro, labels)):
            frac = mb.img.shape[0] / total_images
            last = i == n - 1
            sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
            with sync:
                with record_function("tscd/terms"):
                    terms = self.step_terms(mb, it, lab, norms)
                scaled = {k: v * (1.0 if (norms is not None and k in recipe.count_terms) else frac)
                          for k, v in terms.items()}
                loss = sum(weights[k] * v for k, v in scaled.items())
                with record_function("tscd/backward"):
                    loss.backward()
            for k, v in scaled.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()
            labels[i] = None  # free this micro-batch's labels
        with record_function("tscd/optimizer"):
            self._zero_missing_grads()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)  # no gradients alive between iterations (memory)
            self.scheduler.step()
        recipe.after_step(it)
        names = list(sums)
        floats = torch.stack([sums[k].float() for k in names]).tolist()  # one host transfer for all terms
        values = dict(zip(names, floats))
        values["total"] = sum(weights[k] * values[k] for k in names)
        if not math.isfinite(values["total"]):
            raise FloatingPointError(f"loss is {values['total']} at iteration {self.iteration}: {values}")
        return values

    # -- the loop ------------------------------------------------------------------------------
    def _batches(self):
        """This process's batches, forever (resumed where the checkpoint left the epoch)."""
        return iter(self.batches)

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
            if cfg.plots:  # val_grid.png + curves.png (tscd.visualize)
                from tscd.visualize import write_run_pictures

                self.pictures = write_run_pictures(self)
        return scores

    def _log(self, values: dict) -> None:
        """One log line: losses, the recent speed, the peak GPU memory (CUDA only: the CPU allocator keeps no
        peak) and the ETA at the recent speed."""
        if not self.dist.is_main:
            return
        rate = getattr(self, "rate", None) or RecentRate()
        eta = rate.eta(self.cfg.train.max_iters - self.iteration)
        mem = ""
        if self.device.type == "cuda":
            mem = f", peak {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
        parts = " ".join(f"{k}={v:.4f}" for k, v in values.items() if k not in ("lr",))
        logger.info("iter %d/%d lr=%.3e %s | %.3f s/it%s, ETA %s", self.iteration, self.cfg.train.max_iters,
                    values["lr"], parts, rate.seconds_per_iter(), mem, format_eta(eta))
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, self.iteration)

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> dict:
        """mIoU of the segmentation head, the CAM label and the pseudo labels on the val split, scored by
        :func:`tscd.eval.evaluator.evaluate` with the ``native`` protocol (what ``tscd eval`` reports by default),
        appended to ``<run_dir>/metrics.jsonl``."""
        from tscd.eval.evaluator import evaluate, protocol_settings  # lazy: keeps importing tscd.train light

        settings = protocol_settings("native", self.cfg, self.device, self.cfg.data.val_split, outputs=VAL_OUTPUTS,
                                     num_images=self.cfg.data.val_num)
        try:
            report = evaluate(self.net, self.val_set, settings, self.device, progress=False)
        finally:
            self.net.train()
        scores = report["results"]
        if self.dist.is_main:
            append_metrics(self.run_dir, self.iteration, report, split=self.cfg.data.val_split, source="train")
            logger.info("val @%d (%d images, protocol %s): mIoU seg %.2f | CAM %.2f | pseudo label %.2f",
                        self.iteration, report["num_images"], report["protocol"], scores["seg"]["miou"],
                        scores["cam"]["miou"], scores["pseudo"]["miou"])
            if self.writer is not None:
                from tscd.visualize import tensorboard_images

                for k in scores:
                    self.writer.add_scalar(f"val/miou_{k}", scores[k]["miou"], self.iteration)
                tensorboard_images(self.writer, self.recipe.images(), self.val_set.palette, self.iteration)
        return scores

    def close(self, leave_group: bool = True) -> None:
        """Close the TensorBoard writer and (``leave_group``: a run that succeeded) leave the process group this
        trainer joined (:func:`tscd.train.distributed.close_distributed`)."""
        if self.writer is not None:
            self.writer.close()
        if leave_group:
            close_distributed(self.dist)

