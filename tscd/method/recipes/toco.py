"""``recipe: toco``: ToCo's training iteration (Ru et al., "Token Contrast for Weakly-Supervised Semantic
Segmentation", CVPR 2023), the official VOC and COCO training (configs/toco_voc.yaml, configs/toco_coco.yaml).

Network: a ViT (DeiT-B or ViT-B/16; :mod:`tscd.models.toco_net`) with a frozen positional embedding resized to the
crop, a classifier on the final patch tokens (CAM) and an auxiliary one on an intermediate block's tokens
(``toco.aux_layer``), and a LargeFOV decoder. Data: besides the crop, a second global view and a jittered copy of
the crop from which the local crops are cut (:attr:`ToCoRecipe.views`).

Per iteration t (1-based; the official loop counts n = t - 1 from 0), in the official order:

1. multi-scale CAMs and auxiliary CAMs (no grad, both from one pass per scale);
2. the ROI map of the auxiliary CAM and ``toco.local_crops`` local crops of ``toco.local_crop_size`` px drawn in it,
   each flagged positive or negative (:mod:`tscd.method.token_contrast`);
3. the teacher head's EMA update (momentum ``toco.momentum``), then the trained forward, the class tokens of the
   second global view and of the local crops;
4. L = L_cls + w_aux L_cls_aux + w_ptc L_ptc + w_ctc L_ctc, plus, once n > ``train.cam_iters`` (2000), w_seg L_seg
   + w_reg L_reg on the PAR-refined two-threshold pseudo label (thresholds ``pseudo.bkg_high`` / ``bkg_low``, the
   same as the token label's and the ROI's).

Where the official code computes a thing twice with identical results, it is computed once (numerics unchanged,
docs/differences.md): the first global view is the training image itself, so its class token comes from the
trained forward (the official code encodes that image three times: the forward, the teacher's and the student's
global pass); the teacher's class tokens are the student's, detached; the CAM passes run no decoder, and their
scale-1 pass takes the image's two CAMs from the trained forward (run first: nothing in ToCo's network is random,
so the order changes no number) and encodes the flips only; the seg and reg terms of the warm-up (weighted 0
there) are not computed (the decoder still gets its exact-zero gradient).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from tscd.config import Range, option
from tscd.method.labels import varm_image
from tscd.method.losses import cls_loss, seg_counts, seg_loss
from tscd.method.recipes.base import Batch, Recipe, RecipeContext, register_recipe
from tscd.method.recipes.shared import SharedSteps
from tscd.method.token_contrast import (
    EMATeacher,
    ProjectionHead,
    crop_candidates,
    crop_flags,
    ctc_loss,
    draw_positions,
    gather_crops,
    pair_counts,
    pair_label,
    ptc_loss,
    roi_mask,
    token_label,
)
from tscd.models import multi_scale_cam, multi_scale_cam_reference

if TYPE_CHECKING:
    from torch import nn

    from tscd.config import Config


@dataclass
class ToCoConfig:
    """The ``toco:`` section: ToCo's network option, token-contrast terms and local crops."""

    #: block whose patch tokens feed the auxiliary classifier (ToCo: -3, the tenth of twelve)
    aux_layer: int = option(-3, range=Range(None, None, meaning="a block index, negative from the last (the "
                                                                "network checks it against its depth)"))
    #: PTC and CTC are weighted 0 while the 0-based iteration n <= this (COCO: 12000; -1: from the start, VOC)
    contrast_iters: int = option(-1, range=Range(-1))
    #: the seg / reg label is refined from the auxiliary CAM while n <= this (COCO: 12000; -1: never, VOC)
    aux_label_iters: int = option(-1, range=Range(-1))
    cls_aux: float = option(1.0, range=Range(0))  #: weight of the auxiliary classification loss
    ptc: float = option(0.2, range=Range(0))  #: weight of the patch token contrast
    ctc: float = option(0.5, range=Range(0))  #: weight of the class token contrast
    temp: float = option(0.5, range=Range(0, lo_open=True))  #: CTC temperature
    momentum: float = option(0.9, range=Range(0, 1))  #: EMA momentum of the teacher projection head
    local_crops: int = option(8, range=Range(1))  #: local crops per image
    local_crop_size: int = option(96, range=Range(1))  #: side of a local crop
    #: a local crop is negative when its ROI values (0 / 1 / 2) sum to at most this fraction of its area
    neg_ratio: float = option(0.2, range=Range(0))
    proj_dim: int = option(1024, range=Range(1))  #: projection heads' output width
    proj_hidden: int = option(2048, range=Range(1))  #: projection heads' hidden width
    proj_bottleneck: int = option(256, range=Range(1))  #: projection heads' width before the last layer


def _both_cams(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CAM and the auxiliary CAM of one pass, concatenated on the channels (B, 2C, h, w)."""
    return torch.cat(net.forward_cams(x), 1)


@register_recipe
class ToCoRecipe(Recipe):
    """ToCo (CVPR 2023): auxiliary CAM, patch and class token contrast, PAR pseudo labels after the warm-up."""

    name = "toco"
    config_class = ToCoConfig
    count_terms = ("seg", "ptc")
    #: ToCo's data transform: the crop plus ``view2`` and ``local`` (tscd.data.views)
    views = "toco"
    defaults = {"model.name": "toco_vit_base", "model.drop_path_rate": 0.0, "model.decoder_dim": 512,
                "data.crop_size": 448, "pseudo.refine_mode": "par", "pseudo.bkg_high": 0.7, "pseudo.bkg_low": 0.25,
                "pseudo.cam_bkg": 0.5, "loss.seg": 0.1, "loss.reg": 0.05, "optim.power": 0.9}
    unused = {"loss.aff": 0.0, "loss.scd": 0.0, "loss.er_mode": "off", "model.symmetric_affinity": False}

    def __init__(self, cfg: Config, ctx: RecipeContext) -> None:
        super().__init__(cfg, ctx)
        L, T = cfg.loss, cfg.recipe_cfg
        if 2 * (T.local_crop_size // 2) >= cfg.data.crop_size:
            raise ValueError(f"toco.local_crop_size={T.local_crop_size} does not fit the training crop "
                             f"(data.crop_size={cfg.data.crop_size}): local crops are cut around pixels at least half "
                             f"a crop from the border; use a local crop below the crop size (ToCo: 96 of 448)")
        self.loss_weights = {"cls": L.cls, "cls_aux": T.cls_aux, "ptc": T.ptc, "ctc": T.ctc, "seg": L.seg,
                             "reg": L.reg}
        self.steps = SharedSteps(cfg, ctx)
        dim = ctx.net.encoder.embed_dim
        self.head = ProjectionHead(dim, T.proj_dim, T.proj_hidden, T.proj_bottleneck)
        self.head_t = EMATeacher(self.head, T.momentum)
        #: local-crop positions: a generator of its own, so that other draws do not move them
        self.crop_gen = torch.Generator(device=ctx.device).manual_seed(cfg.train.seed * 1000 + 29 + ctx.rank)
        self._ema_iteration = 0
        #: one CAM pass's CAM and auxiliary CAM as one map of 2C channels (compiled with train.compile: cams / all)
        self._cam_fn = functools.partial(ctx.compiled(_both_cams, "the CAM pass"), ctx.net)

    @classmethod
    def build_network(cls, cfg: Config, num_classes: int) -> nn.Module:
        from tscd.models import create_toco_model

        m = cfg.model
        return create_toco_model(m.name, num_classes=num_classes, pretrained=m.pretrained,
                                 drop_path_rate=m.drop_path_rate, decoder_dim=m.decoder_dim, pooling=m.pooling,
                                 aux_layer=cfg.recipe_cfg.aux_layer)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """ToCo's groups: the whole encoder (norms included) at ``lr``, classifiers, decoder and the student head
        at 10x, the same weight decay everywhere."""
        from tscd.models.toco_net import param_groups as toco_groups

        groups = toco_groups(self.ctx.net, lr, weight_decay)
        own = [p for p in self.parameters() if p.requires_grad]
        groups.append({"name": "recipe", "params": own, "lr": 10.0 * lr, "lr_mult": 10.0,
                       "weight_decay": weight_decay})
        return groups

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"crop_gen": self.crop_gen.get_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.crop_gen.set_state(state["crop_gen"])

    # -- labels --------------------------------------------------------------------------------
    def cams(self, img: torch.Tensor, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-scale (+ flip) CAMs and auxiliary CAMs (B, C, H, W) in [0, 1], no gradient: one pass per scale
        gives both (official-code mode: the full forward, decoder included).

        ``out``: the trained forward's output on ``img``. Its two CAMs are the scale-1 pass's for the un-flipped
        images: the same numbers when the network has no stochastic layer (ToCo's ViT: no dropout, no drop-path),
        so that pass then runs the flips only (with drop-path only under ``pseudo.cam_scale1: forward``).
        ``pseudo.cam_amp: bf16`` and ``pseudo.cam_flip: separate`` act as in TSCD and AFA (docs/differences.md).
        """
        net = self.ctx.net
        C = net.classifier.out_channels
        p = self.cfg.pseudo
        known = None
        if out is not None and (self.cfg.model.drop_path_rate == 0 or p.cam_scale1 == "forward"):
            known = {1.0: torch.cat([out.cam, out.cam_aux], 1).detach()}
        with torch.no_grad(), self.steps.cam_autocast(img), record_function("tscd/cam_passes"):
            if self.steps.official:
                both = multi_scale_cam_reference(net, img, p.cam_scales,
                                                 cam_of=lambda o: torch.cat([o.cam, o.cam_aux], 1))
            else:
                both = multi_scale_cam(net, img, p.cam_scales, cam_fn=self._cam_fn, known=known,
                                       separate_flip=p.cam_flip == "separate")
        both = both.float()
        return both[:, :C], both[:, C:]

    def crop_positions(self, roi: torch.Tensor) -> torch.Tensor:
        """(B, K, 2) top-left corners of the local crops, drawn among the candidates of ``roi``."""
        T = self.cfg.recipe_cfg
        return draw_positions(crop_candidates(roi, T.local_crop_size, T.local_crops), T.local_crops, self.crop_gen)

    def contrast(self, iteration: int) -> bool:
        """Whether the token-contrast terms are on: the official n = t - 1 > ``toco.contrast_iters``."""
        return iteration - 1 > self.cfg.recipe_cfg.contrast_iters

    def labels(self, batch: Batch, iteration: int, out=None) -> dict[str, torch.Tensor]:
        """CAMs -> ROI, local crops and flags; auxiliary CAM -> token pair label (with the contrast terms); after
        the warm-up, the PAR pseudo label (no gradient, no host sync). Nothing the iteration does not use.
        ``out``: the trained forward's output on the batch (its scale-1 CAMs, :meth:`cams`)."""
        img, cls_label, img_box = batch.img, batch.cls_label, batch.img_box
        if not batch.views or {"view2", "local"} - set(batch.views):
            raise ValueError("toco recipe: the batch lacks the views 'view2' and 'local' of ToCo's data transform "
                             "(tscd.data.views.ToCoTrainTransform)")
        p, L, T = self.cfg.pseudo, self.cfg.loss, self.cfg.recipe_cfg
        H, W = img.shape[-2:]
        contrast = self.contrast(iteration) and (T.ptc or T.ctc)
        seg = not self.warmup(iteration) and (L.seg or L.reg)
        if not (contrast or seg):
            return {}
        cams, cams_aux = self.cams(img, out)
        labels = {"cams": cams}
        if contrast:
            with torch.no_grad(), record_function("tscd/local_crops"):
                roi = roi_mask(cams_aux, cls_label, p.bkg_low, p.bkg_high)
                pos = self.crop_positions(roi)
                s = T.local_crop_size
                labels.update(crops=gather_crops(batch.views["local"], pos, s),
                              flags=crop_flags(roi, pos, s, T.neg_ratio))
            ps = self.ctx.net.encoder.patch_size
            with torch.no_grad(), record_function("tscd/token_label"):
                tok = token_label(cams_aux, cls_label, img_box, (H // ps, W // ps), p.bkg_low, p.bkg_high)
                labels["pairs"] = pair_label(tok)
        if seg:
            source = cams_aux if iteration - 1 <= T.aux_label_iters else cams
            labels["pseudo"] = self.steps.pseudo_label(img, source, cls_label, img_box)
        return labels

    def counts(self, labels: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
        out = {}
        if "pairs" in labels:
            out["ptc"] = pair_counts(labels["pairs"])
        if "pseudo" in labels:
            out["seg"] = seg_counts(labels["pseudo"])
        return out

    # -- terms ---------------------------------------------------------------------------------
    def _ema(self, iteration: int) -> None:
        """The teacher head's EMA update, once per iteration before the teacher's pass (where the official code
        does it: at the start of every iteration's forward, the first one included)."""
        if self._ema_iteration != iteration:
            self.head_t.update(self.head)
            self._ema_iteration = iteration

    def terms(self, batch: Batch, iteration: int, labels: dict[str, torch.Tensor] | None = None,
              norms: dict[str, tuple[torch.Tensor, ...]] | None = None) -> dict[str, torch.Tensor]:
        img, cls_label, img_box = batch.img, batch.cls_label, batch.img_box
        L, T, ctx = self.cfg.loss, self.cfg.recipe_cfg, self.ctx
        H, W = img.shape[-2:]
        norms = norms or {}
        warm = self.warmup(iteration)
        self._ema(iteration)
        if labels is None and self.steps.official:  # the official order: CAM passes and crops first
            labels = self.labels(batch, iteration)
        with ctx.autocast(), record_function("tscd/forward/view1"):
            out = ctx.model(img, cls_only=warm and not self.steps.official)
        if labels is None:  # after the trained forward (nothing in it is random): its CAMs serve the scale-1 pass
            labels = self.labels(batch, iteration, out)
        terms = {"cls": cls_loss(out.cls_logits.float(), cls_label)}
        if T.cls_aux:
            terms["cls_aux"] = cls_loss(out.cls_aux_logits.float(), cls_label)
        contrast = "pairs" in labels
        if T.ptc and contrast:
            share = 1.0 / self.cfg.train.accum_steps if "ptc" in norms else 1.0
            with record_function("tscd/ptc_loss"):
                terms["ptc"] = ptc_loss(out.tokens, labels["pairs"], counts=norms.get("ptc"), share=share)
        if T.ctc and contrast:
            terms["ctc"] = self._ctc(img, out.cls_token, batch.views["view2"], labels)
        self.last = {"img01": varm_image(img[:1])}
        if "cams" in labels:
            self.last["cam"] = labels["cams"][:1].clone()
        if not warm and "pseudo" in labels:
            pseudo = labels["pseudo"]
            seg_up = F.interpolate(out.seg_logits.float(), size=(H, W), mode="bilinear", align_corners=False)
            self.last.update(pseudo=pseudo[:1].clone(), pred=seg_up[:1].detach().argmax(1))
            if L.seg:
                terms["seg"] = seg_loss(seg_up, pseudo, counts=norms.get("seg"))
            if L.reg:
                terms["reg"] = self.steps.crf_loss(img, seg_up.softmax(1), pseudo, img_box)
        return terms

    def _ctc(self, img: torch.Tensor, cls1: torch.Tensor, view2: torch.Tensor,
             labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The class token contrast: teacher on the two global views' class tokens (detached), student on those
        and the local crops'. Official-code mode: the official passes (the first view encoded twice more)."""
        net, ctx = self.ctx.net, self.ctx
        with ctx.autocast(), record_function("tscd/forward/views"):
            if self.steps.official:
                g_t = net.encode_cls(torch.cat([img, view2])).detach()
                g = net.encode_cls(torch.cat([img, view2]))
            else:
                g = torch.cat([cls1, net.encode_cls(view2)])
                g_t = g.detach()
            loc = net.encode_cls(labels["crops"])
            teacher = self.head_t(g_t)
            student = self.head(torch.cat([g, loc]))
        with record_function("tscd/ctc_loss"):
            return ctc_loss(student, teacher, labels["flags"], self.cfg.recipe_cfg.temp)
