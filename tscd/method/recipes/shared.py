"""The steps TSCD and AFA share: multi-scale CAMs, two-threshold refined pseudo labels, the CRF energy term.

:class:`SharedSteps` runs them our way (fused kernels, every image and both thresholds in one refine call, the CRF
loss on the tensors' device) or, with ``train.reference_style`` (the official-code mode), in the official code's
structure: full-network CAM passes, one refine call per image and threshold, the pure-PyTorch ops, the CRF loss
copied to the host. The choice is made here, once, when a recipe is built; the numerics of that mode (fp32, black
padding, the field's CRF gain, decoder BatchNorm updates in the CAM passes) are set by
:func:`tscd.config.resolve_config`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from tscd.kernels import dense_energy_loss
from tscd.method.labels import box_mask, refine_cams_with_bkg, refine_cams_with_bkg_sequential, varm_image
from tscd.method.losses import affinity_counts, cls_loss, seg_counts
from tscd.models import encode_pass, multi_scale_cam, multi_scale_cam_reference

if TYPE_CHECKING:
    from tscd.config import Config
    from tscd.method.recipes.base import Batch, RecipeContext


def seg_aff_counts(seg_label: torch.Tensor, aff_label: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, ...]]:
    """The normalisers of the ``seg`` and (when there is an affinity label) ``aff`` count terms."""
    out = {"seg": seg_counts(seg_label)}
    if aff_label is not None:
        out["aff"] = affinity_counts(aff_label)
    return out


class SharedSteps:
    """CAMs, pseudo labels and the CRF term of a recipe (module docstring).

    Args:
        cfg: the resolved config (``pseudo``, ``loss``, ``train.backend``, ``train.reference_style``).
        ctx: the recipe's context (network, device, autocast).

    Attributes:
        official: the official code's structure (``train.reference_style``).
        backend: kernel backend of the fused ops (``torch`` in the official-code mode).
    """

    def __init__(self, cfg: Config, ctx: RecipeContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.official = cfg.train.reference_style
        self.backend = "torch" if self.official else cfg.train.backend
        self.encode_fn = ctx.compiled(encode_pass, "the CAM pass")  # compiled with train.compile: cams / all

    def warmup_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """A classification-only iteration: the trained forward without decoder and affinity head, L_cls."""
        with self.ctx.autocast():
            out = self.ctx.model(batch.img, cls_only=True)
        return {"cls": cls_loss(out.cls_logits.float(), batch.cls_label)}

    def cams(self, img: torch.Tensor, affinity: bool = False, cam1: torch.Tensor | None = None):
        """Multi-scale CAMs (B, C, H, W) in [0, 1], no gradient, in the network's train mode (the decoder's BN
        statistics update as in the official full-network CAM passes unless ``pseudo.cam_decoder`` is off).

        With ``affinity``: also the predicted affinity (B, N, N) of the pass at the largest scale, un-flipped
        images (AFA's ``multi_scale_cam_with_aff_mat``), as ``(cams, affinity)``. ``cam1``: the training forward's
        raw CAM of ``img`` (used at scale 1 with ``pseudo.cam_scale1: forward``).
        Switches (docs/differences.md): ``pseudo.cam_amp`` (bf16 passes), ``pseudo.cam_flip`` (separate passes).
        """
        p = self.cfg.pseudo
        known = {1.0: cam1.detach()} if cam1 is not None and p.cam_scale1 == "forward" else None
        with torch.no_grad(), self.cam_autocast(img), record_function("tscd/cam_passes"):
            if self.official:
                out = multi_scale_cam_reference(self.ctx.net, img, p.cam_scales, affinity=affinity)
            else:
                out = multi_scale_cam(self.ctx.net, img, p.cam_scales, decoder=p.cam_decoder, affinity=affinity,
                                      separate_flip=p.cam_flip == "separate", known=known, encode_fn=self.encode_fn)
        if affinity:
            return out[0].float(), out[1].float()
        return out.float()

    def cam_autocast(self, img: torch.Tensor):
        """The CAM passes' autocast: bf16 with ``pseudo.cam_amp: bf16`` (the passes only), else the training's."""
        if self.cfg.pseudo.cam_amp == "bf16":
            return torch.autocast(img.device.type, dtype=torch.bfloat16)
        return self.ctx.autocast()

    def pseudo_label(self, img: torch.Tensor, cams: torch.Tensor, cls_label: torch.Tensor,
                     img_box: torch.Tensor) -> torch.Tensor:
        """The refined two-threshold pseudo label (B, H, W) int64 (docs/method.md 3; ``pseudo.refine_mode``)."""
        p = self.cfg.pseudo
        make = refine_cams_with_bkg_sequential if self.official else refine_cams_with_bkg
        with record_function("tscd/pseudo_label"):
            return make(varm_image(img), cams, cls_label, img_box, bkg_high=p.bkg_high, bkg_low=p.bkg_low,
                        scale=p.refine_scale, mode=p.refine_mode, num_iter=p.refine_iters,
                        dilations=p.dilations, backend=self.backend)

    def crf_loss(self, img: torch.Tensor, probs: torch.Tensor, label: torch.Tensor,
                 img_box: torch.Tensor) -> torch.Tensor:
        """The CRF energy ("reg") loss (docs/method.md 4.5) of softmax probabilities (B, K, H, W) at the crop size,
        on the device (official-code mode: on the host, C++ lattice)."""
        L = self.cfg.loss
        H, W = img.shape[-2:]
        roi = box_mask(img_box, H, W).float()
        args = (varm_image(img, truncate=False) * 255.0, probs, roi, label)
        if self.official:  # the official code copies everything to the host and runs the C++ lattice there
            args = tuple(a.cpu() for a in args)
        with record_function("tscd/crf_loss"):
            return dense_energy_loss(*args, sigma_rgb=L.crf_sigma_rgb, sigma_xy=L.crf_sigma_xy, scale=L.crf_scale,
                                     gain=L.crf_gain, backend="cpp" if self.official else self.backend
                                     ).to(self.ctx.device)
