"""``recipe: tscd``: TSCD's training iteration (docs/method.md; the default recipe).

Per iteration t (1-based; the official loop counts n = t - 1 from 0):

* n <= ``train.cam_iters``: L = L_cls (nothing else is computed; the trainer gives every other trainable
  parameter an exact-zero gradient, as the official ``cls + 0 * seg + ...``, so AdamW counts the step).
* afterwards: view-1 forward; its multi-scale CAMs (no grad) -> refined two-threshold pseudo labels (VARM) ->
  affinity labels; view-2 forward and CAMs; L = L_cls + w_seg L_seg + w_reg L_reg + w_aff L_aff + w_scd L_scd
  (+ w_er L_er with ``loss.er_mode: grad``). A term whose weight is 0 is not computed.

Its keys are the shared ``pseudo`` and ``loss`` sections (SCD: ``loss.scd``, ``scd_samples``, ``scd_scale``; ER:
``loss.er``, ``er_mode``); it has no section of its own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from tscd.kernels import correlation_loss
from tscd.method.labels import affinity_label, varm_image
from tscd.method.losses import affinity_loss, cls_loss, equivariance_loss, seg_loss
from tscd.method.recipes.base import Batch, Recipe, RecipeContext, register_recipe
from tscd.method.recipes.shared import SharedSteps, seg_aff_counts

if TYPE_CHECKING:
    from tscd.config import Config


@register_recipe
class TSCDRecipe(Recipe):
    """TSCD (AAAI 2023): VARM pseudo labels, segmentation, affinity, CRF energy and SCD losses."""

    name = "tscd"
    count_terms = ("seg", "aff")

    def __init__(self, cfg: Config, ctx: RecipeContext) -> None:
        super().__init__(cfg, ctx)
        L = cfg.loss
        self.loss_weights = {"cls": L.cls, "seg": L.seg, "aff": L.aff, "reg": L.reg, "scd": L.scd, "er": L.er}
        self.steps = SharedSteps(cfg, ctx)
        #: SCD's sampling points: a generator of its own, so that other draws do not move them
        self.scd_gen = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + 17 + ctx.rank)

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"scd_gen": self.scd_gen.get_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.scd_gen.set_state(state["scd_gen"])

    def labels(self, batch: Batch, iteration: int, cam1: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """View-1 CAMs -> pseudo labels -> affinity labels (no grad, no host sync on the default path); ``cam1``: the
        view-1 forward's CAM (``pseudo.cam_scale1: forward``)."""
        if self.warmup(iteration):
            return None
        img, cls_label, img_box = batch.img, batch.cls_label, batch.img_box
        cams = self.steps.cams(img, cam1=cam1)
        labels = {"cams": cams, "pseudo": self.steps.pseudo_label(img, cams, cls_label, img_box)}
        if self.cfg.loss.aff:
            H, W = img.shape[-2:]
            with record_function("tscd/affinity_label"):
                labels["aff"] = affinity_label(labels["pseudo"], (-(-H // 16), -(-W // 16)), self.cfg.loss.aff_radius)
        return labels

    def counts(self, labels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        return seg_aff_counts(labels["pseudo"], labels.get("aff"))

    def terms(self, batch: Batch, iteration: int, labels: dict[str, torch.Tensor] | None = None,
              norms: dict[str, tuple[torch.Tensor, ...]] | None = None) -> dict[str, torch.Tensor]:
        if self.warmup(iteration):
            return self.steps.warmup_terms(batch)
        img, cls_label, img_box = batch.img, batch.cls_label, batch.img_box
        L, ctx = self.cfg.loss, self.ctx
        terms: dict[str, torch.Tensor] = {}
        B, _, H, W = img.shape
        with ctx.autocast(), record_function("tscd/forward/view1"):
            out = ctx.model(img)
        if labels is None:  # after the view-1 forward: the official order of the forward passes
            labels = self.labels(batch, iteration, cam1=out.cam)
        cams, pseudo = labels["cams"], labels["pseudo"]
        norms = norms or {}
        terms["cls"] = cls_loss(out.cls_logits.float(), cls_label)
        seg_up = F.interpolate(out.seg_logits.float(), size=(H, W), mode="bilinear", align_corners=True)
        # kept for TensorBoard images only, as copies (a view would keep the whole batch alive)
        self.last = {"img01": varm_image(img[:1]), "cam": cams[:1].clone(), "pseudo": pseudo[:1].clone(),
                     "pred": seg_up[:1].detach().argmax(1)}
        if L.seg:
            terms["seg"] = seg_loss(seg_up, pseudo, counts=norms.get("seg"))
        if L.aff:
            n = out.affinity.shape[-1]
            h16, w16 = out.cam.shape[-2:]
            if h16 * w16 != n or labels["aff"].shape[-1] != n:
                raise RuntimeError(f"tscd recipe: the affinity has {n} positions, the 1/16 grid {h16}x{w16}")
            terms["aff"] = affinity_loss(out.affinity.float(), labels["aff"], counts=norms.get("aff"))
        if L.reg:
            terms["reg"] = self.steps.crf_loss(img, seg_up.softmax(1), pseudo, img_box)
        if L.scd or (L.er and L.er_mode == "grad"):
            view2 = F.interpolate(img, scale_factor=L.scd_scale, mode="bilinear", align_corners=True)
            with ctx.autocast(), record_function("tscd/forward/view2"):
                out2 = ctx.net(view2)
            if L.scd:
                t2 = self.steps.cams(view2)
                s2 = F.interpolate(out2.seg_logits.float(), size=t2.shape[-2:], mode="bilinear", align_corners=True)
                with record_function("tscd/scd_loss"):
                    terms["scd"] = correlation_loss(cams, t2, seg_up, s2, num_samples=L.scd_samples,
                                                    generator=self.scd_gen, backend=self.steps.backend)
            if L.er and L.er_mode == "grad":
                terms["er"] = equivariance_loss(out.cam.float(), out2.cam.float())
        return terms
