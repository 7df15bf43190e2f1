"""The training iteration as the trainer ran it before recipes (commit 0fdd191), kept as a transcription.

``tests/train/test_recipe_tscd.py`` runs this next to the current trainer on the same weights, batches and random
streams: ``recipe: tscd`` must give the same loss terms, gradients, BatchNorm buffers and optimizer state, to the
bit. The code below is the old ``Trainer`` methods (``_official_settings``, ``_cams``, ``_pseudo_labels``,
``_count_norms``, ``_micro_terms``, ``_zero_missing_grads``, ``train_step``) and ``memory.resolve_memory_mode``,
with ``self`` turned into :class:`PreRecipeStep`; do not "improve" it, it is the reference.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F

from tscd.constants import IGNORE_INDEX
from tscd.kernels import correlation_loss, dense_energy_loss
from tscd.method.labels import (
    affinity_label,
    box_mask,
    refine_cams_with_bkg,
    refine_cams_with_bkg_sequential,
    varm_image,
)
from tscd.models import multi_scale_cam, multi_scale_cam_reference, param_groups
from tscd.train.losses import affinity_loss, cls_loss, equivariance_loss, seg_loss
from tscd.train.schedule import build_optimizer

COUNT_TERMS = ("seg", "aff")


def old_resolve_memory_mode(cfg, world_size: int = 1):
    """``train.memory=low``: bf16, checkpointing ``all``, micro-batches of one image (the old memory.py)."""
    if cfg.train.memory == "default":
        return cfg
    out = copy.deepcopy(cfg)
    out.train.amp = "bf16"
    out.train.checkpointing = "all"
    out.train.accum_steps = max(1, cfg.data.batch_size // max(1, world_size))
    return out


class PreRecipeStep:
    """The old trainer's iteration on its own copy of the network, optimizer, schedule and SCD generator.

    Args:
        cfg: the configuration as loaded (before any resolution).
        net: a copy of the network (same weights as the trainer under test).
        device: where it runs.
    """

    def __init__(self, cfg, net: torch.nn.Module, device: torch.device) -> None:
        self.cfg = cfg = old_resolve_memory_mode(cfg)
        self.device = device
        amp = (cfg.train.amp == "bf16") or (cfg.train.amp == "auto" and device.type == "cuda")
        settings = {"amp": amp, "cam_decoder": cfg.pseudo.cam_decoder, "crf_gain": cfg.loss.crf_gain}
        if cfg.train.reference_style:
            settings = {"amp": False, "cam_decoder": True, "crf_gain": "field"}
        self.amp, self.cam_decoder, self.crf_gain = settings["amp"], settings["cam_decoder"], settings["crf_gain"]
        net.set_checkpointing(cfg.train.checkpointing)
        self.net = self.model = net
        o = cfg.optim
        self.optimizer, self.scheduler = build_optimizer(
            param_groups(net, o.lr, o.weight_decay), o.lr, o.betas, o.weight_decay, cfg.train.max_iters,
            o.warmup_iters, o.warmup_ratio, o.power)
        self.scd_gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + 17)
        self.iteration = 0
        self.grads: dict[str, torch.Tensor | None] = {}

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batches(self, batch: dict) -> list[dict]:
        n = self.cfg.train.accum_steps
        size = batch["img"].shape[0] // n
        keys = ("img", "cls_label", "img_box")
        return [{k: batch[k][i * size:(i + 1) * size] for k in keys} for i in range(n)]

    def _inputs(self, mb: dict):
        return mb["img"].to(self.device), mb["cls_label"].to(self.device), mb["img_box"].to(self.device)

    def _cams(self, img):
        scales = self.cfg.pseudo.cam_scales
        with torch.no_grad(), self._autocast():
            if self.cfg.train.reference_style:
                return multi_scale_cam_reference(self.net, img, scales).float()
            return multi_scale_cam(self.net, img, scales, decoder=self.cam_decoder).float()

    def _pseudo_labels(self, img, cls_label, img_box) -> dict:
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
    def _count_norms(labels: list[dict]):
        pseudo = [lab["pseudo"] for lab in labels]
        norms = {"seg": (sum((p == 0).sum() for p in pseudo),
                         sum(((p != 0) & (p != IGNORE_INDEX)).sum() for p in pseudo))}
        if "aff" in labels[0]:
            norms["aff"] = (sum((lab["aff"] == 1).sum() for lab in labels),
                            sum((lab["aff"] == 0).sum() for lab in labels))
        return norms

    def _micro_terms(self, img, cls_label, img_box, warmup, labels, norms):
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
        if L.seg:
            terms["seg"] = seg_loss(seg_up, pseudo, counts=norms.get("seg"))
        if L.aff:
            terms["aff"] = affinity_loss(out.affinity.float(), labels["aff"], counts=norms.get("aff"))
        if L.reg:
            roi = box_mask(img_box, H, W).float()
            args = (varm_image(img, truncate=False) * 255.0, seg_up.softmax(1), roi, pseudo)
            if ref_style:
                args = tuple(a.cpu() for a in args)
            terms["reg"] = dense_energy_loss(*args, sigma_rgb=L.crf_sigma_rgb, sigma_xy=L.crf_sigma_xy,
                                             scale=L.crf_scale, gain=self.crf_gain,
                                             backend="cpp" if ref_style else backend).to(self.device)
        if L.scd or (L.er and L.er_mode == "grad"):
            view2 = F.interpolate(img, scale_factor=L.scd_scale, mode="bilinear", align_corners=True)
            with self._autocast():
                out2 = self.net(view2)
            if L.scd:
                t2 = self._cams(view2)
                s2 = F.interpolate(out2.seg_logits.float(), size=t2.shape[-2:], mode="bilinear", align_corners=True)
                terms["scd"] = correlation_loss(cams, t2, seg_up, s2, num_samples=L.scd_samples,
                                                generator=self.scd_gen, backend=backend)
            if L.er and L.er_mode == "grad":
                terms["er"] = equivariance_loss(out.cam.float(), out2.cam.float())
        return terms

    def _zero_missing_grads(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)

    def train_step(self, batch: dict) -> dict[str, float]:
        """The old ``Trainer.train_step``; also keeps the gradients the optimizer saw in :attr:`grads`."""
        cfg = self.cfg
        warmup = self.iteration <= cfg.train.cam_iters + 1
        weights = {"cls": cfg.loss.cls, "seg": cfg.loss.seg, "aff": cfg.loss.aff, "reg": cfg.loss.reg,
                   "scd": cfg.loss.scd, "er": cfg.loss.er}
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = [self._inputs(mb) for mb in self._micro_batches(batch)]
        n = len(micro)
        total_images = sum(img.shape[0] for img, _, _ in micro)
        labels: list[dict | None] = [None] * n
        norms = None
        if n > 1 and not warmup:
            labels = [self._pseudo_labels(*mb) for mb in micro]
            norms = self._count_norms(labels)
        sums: dict[str, torch.Tensor] = {}
        for i, (mb, lab) in enumerate(zip(micro, labels)):
            frac = mb[0].shape[0] / total_images
            terms = self._micro_terms(*mb, warmup, lab, norms)
            scaled = {k: v * (1.0 if (norms is not None and k in COUNT_TERMS) else frac) for k, v in terms.items()}
            loss = sum(weights[k] * v for k, v in scaled.items())
            loss.backward()
            for k, v in scaled.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()
            labels[i] = None
        self._zero_missing_grads()
        self.grads = {name: p.grad.detach().clone() for name, p in self.net.named_parameters()}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        names = list(sums)
        floats = torch.stack([sums[k].float() for k in names]).tolist()
        values = dict(zip(names, floats))
        values["total"] = sum(weights[k] * values[k] for k in names)
        if not math.isfinite(values["total"]):
            raise FloatingPointError(f"loss is {values['total']} at iteration {self.iteration}: {values}")
        return values
