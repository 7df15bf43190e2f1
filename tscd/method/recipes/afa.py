"""``recipe: afa``: AFA's training iteration (Ru et al., "Learning Affinity from Attention", CVPR 2022), the
official VOC and COCO training (configs/afa_voc.yaml, configs/afa_coco.yaml).

Per iteration t (1-based; the official loop counts n = t - 1 from 0):

* n <= ``train.cam_iters``: L = L_cls (as TSCD's warm-up).
* afterwards: the trained forward (the affinity head sees the attention symmetrised, ``A + A^T``:
  ``model.symmetric_affinity``); multi-scale CAMs (no grad); the PAR-refined two-threshold pseudo label
  (``pseudo.refine_mode: par``); L = L_cls + w_seg L_seg + w_aff L_aff (+ w_reg L_reg with ``loss.reg`` > 0) with

  - the segmentation label: the pseudo label while n <= ``afa.switch_iters`` (VOC 6000, COCO 15000); after it,
    the CAMs propagated by the affinity predicted in the largest-scale CAM pass (random walk with both
    background scores), refined per image inside its box with PAR (``refine_propagated_cams``);
  - the affinity label: from the pseudo label (VOC), or from the segmentation label after the switch
    (``afa.switch_aff_label``, COCO);
  - the logits upsampled to the crop with ``align_corners=False`` (TSCD: True).

No SCD, no second view, no ER. The released VOC script has the CRF term commented out (``# + 0.01 * reg_loss``),
so ``loss.reg`` defaults to 0 here; ``loss.reg=0.01`` restores it (the run behind AFA's published log), on our
lattice with the field's gain. Its YAML's ``cam.aff_thre`` is read by no function of the released code (0.4 there,
0.3 in the log's run): there is nothing to switch (docs/differences.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tscd.config import Range, option
from tscd.method.labels import affinity_label, refine_propagated_cams, varm_image
from tscd.method.losses import affinity_loss, cls_loss, seg_loss
from tscd.method.random_walk import grid_size
from tscd.method.recipes.base import Batch, Recipe, RecipeContext, register_recipe
from tscd.method.recipes.shared import SharedSteps, seg_aff_counts

if TYPE_CHECKING:
    from tscd.config import Config


@dataclass
class AFAConfig:
    """The ``afa:`` section: AFA's label switch."""

    #: the segmentation label becomes the affinity-propagated, PAR-refined CAM label after this 0-based
    #: iteration (AFA: 6000 on VOC, 15000 on COCO)
    switch_iters: int = option(6000, range=Range(0))
    #: after the switch, the affinity label comes from that label too (AFA's COCO script); false: always from
    #: the refined pseudo label (its VOC script)
    switch_aff_label: bool = False


@register_recipe
class AFARecipe(Recipe):
    """AFA (CVPR 2022): PAR pseudo labels, affinity from attention, the propagated-label switch."""

    name = "afa"
    config_class = AFAConfig
    count_terms = ("seg", "aff")
    defaults = {"model.symmetric_affinity": True, "pseudo.refine_mode": "par", "loss.reg": 0.0}
    unused = {"loss.scd": 0.0, "loss.er_mode": "off"}

    def __init__(self, cfg: Config, ctx: RecipeContext) -> None:
        super().__init__(cfg, ctx)
        L = cfg.loss
        self.loss_weights = {"cls": L.cls, "seg": L.seg, "aff": L.aff, "reg": L.reg}
        self.steps = SharedSteps(cfg, ctx)

    def switched(self, iteration: int) -> bool:
        """Whether the segmentation label is the propagated one: the official n = t - 1 > ``switch_iters``."""
        return iteration - 1 > self.cfg.recipe_cfg.switch_iters

    def labels(self, batch: Batch, iteration: int, cam1: torch.Tensor | None = None) -> dict[str, torch.Tensor] | None:
        """CAMs -> PAR pseudo label; after the switch also the propagated label; affinity labels (no grad).
        ``cam1``: the trained forward's CAM (``pseudo.cam_scale1: forward``)."""
        if self.warmup(iteration):
            return None
        img, cls_label, img_box = batch.img, batch.cls_label, batch.img_box
        p, L = self.cfg.pseudo, self.cfg.loss
        H, W = img.shape[-2:]
        switched = self.switched(iteration)
        if switched:
            cams, aff = self.steps.cams(img, affinity=True, cam1=cam1)
        else:
            cams = self.steps.cams(img, cam1=cam1)
        pseudo = self.steps.pseudo_label(img, cams, cls_label, img_box)
        seg = pseudo
        if switched:
            top = max(p.cam_scales)
            grid = grid_size(int(top * H), int(top * W), aff.shape[-1])
            seg = refine_propagated_cams(varm_image(img), cams, aff, cls_label, img_box, grid, bkg_high=p.bkg_high,
                                         bkg_low=p.bkg_low, radius=L.aff_radius, mode=p.refine_mode,
                                         num_iter=p.refine_iters, dilations=p.dilations, backend=self.steps.backend)
        labels = {"cams": cams, "pseudo": pseudo, "seg": seg}
        if L.aff:
            source = seg if switched and self.cfg.recipe_cfg.switch_aff_label else pseudo
            labels["aff"] = affinity_label(source, (-(-H // 16), -(-W // 16)), L.aff_radius)
        return labels

    def counts(self, labels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        return seg_aff_counts(labels["seg"], labels.get("aff"))

    def terms(self, batch: Batch, iteration: int, labels: dict[str, torch.Tensor] | None = None,
              norms: dict[str, tuple[torch.Tensor, ...]] | None = None) -> dict[str, torch.Tensor]:
        if self.warmup(iteration):
            return self.steps.warmup_terms(batch)
        img, cls_label, img_box = batch.img, batch.cls_label, batch.img_box
        L, ctx = self.cfg.loss, self.ctx
        H, W = img.shape[-2:]
        with ctx.autocast():
            out = ctx.model(img)  # AFA's order: the trained forward, then the CAM passes
        if labels is None:
            labels = self.labels(batch, iteration, cam1=out.cam)
        norms = norms or {}
        terms = {"cls": cls_loss(out.cls_logits.float(), cls_label)}
        seg_up = F.interpolate(out.seg_logits.float(), size=(H, W), mode="bilinear", align_corners=False)
        self.last = {"img01": varm_image(img[:1]), "cam": labels["cams"][:1].clone(),
                     "pseudo": labels["seg"][:1].clone(), "pred": seg_up[:1].detach().argmax(1)}
        if L.seg:
            terms["seg"] = seg_loss(seg_up, labels["seg"], counts=norms.get("seg"))
        if L.aff:
            terms["aff"] = affinity_loss(out.affinity.float(), labels["aff"], counts=norms.get("aff"))
        if L.reg:
            terms["reg"] = self.steps.crf_loss(img, seg_up.softmax(1), labels["seg"], img_box)
        return terms
