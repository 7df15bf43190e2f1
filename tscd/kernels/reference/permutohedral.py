"""Reference for ``permutohedral``: exact dense Gaussian filtering, the CRF energy loss (docs/method.md 4.5) and
mean-field dense-CRF inference (docs/method.md 6).

The lattice of the fused backends approximates the dense Gaussian affinity computed here exactly:

    W_ij = exp(-|f_i - f_j|^2 / 2)      (features f already divided by their sigmas; W_ii = 1)

O(N^2) time, O(chunk * N) memory: for tests on small images and as ``backend="torch"``. Plain,
differentiable PyTorch on any device and dtype. The pre-processing of the loss (resizing, gate, ROI)
and the mean-field loop are written once here and shared by every backend, which only swap the filter.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tscd.constants import IGNORE_INDEX

#: The exact dense filter refuses more points than this per image (N^2 affinities).
MAX_DENSE_POINTS = 16384
#: The lattice's range (csrc/permutohedral.h kMaxFeature): a feature beyond +-2^20 (in standard deviations) is
#: treated like a non-finite one by every backend.
MAX_FEATURE = 2.0 ** 20
#: Rows of W materialised at once.
_CHUNK = 2048

#: A filter: (values (B, K, N), features (B, D, N), normalize, include_self) -> (B, K, N).
FilterFn = Callable[[torch.Tensor, torch.Tensor, bool, bool], torch.Tensor]


def nonfinite_poison(values: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(B, K, 1): NaN for the output channels that a non-finite input makes undefined, 1 elsewhere.

    Channel (b, k) is NaN when ``values[b, k]`` holds a NaN or +-inf, or when any feature of image b is NaN,
    +-inf or beyond +-:data:`MAX_FEATURE`. Every backend multiplies its filter output by this, so all of them
    return the same NaN pattern (and a NaN gradient w.r.t. those channels' values), on the device, without a
    host sync.
    """
    bad_feat = ~(features.abs() <= MAX_FEATURE).all(dim=2).all(dim=1)  # (B,); NaN compares false
    bad_val = ~torch.isfinite(values).all(dim=2)  # (B, K)
    bad = bad_val | bad_feat.unsqueeze(1)
    one = torch.ones((), dtype=values.dtype, device=values.device)
    return torch.where(bad, torch.full_like(one, float("nan")), one).unsqueeze(2)


def permutohedral_filter_reference(values: torch.Tensor, features: torch.Tensor, *, normalize: bool = False,
                                   include_self: bool = True) -> torch.Tensor:
    """Exact Gaussian filtering ``out[b, k, i] = sum_j W_ij values[b, k, j]``, W_ij = exp(-|f_i - f_j|^2 / 2).

    Args:
        values: (B, K, N) float.
        features: (B, D, N) float, same device; each feature already divided by its standard deviation.
        normalize: divide by the row sums of W (``sum_j W_ij``), i.e. a weighted average.
        include_self: keep the diagonal W_ii = 1; if False it is removed from the sum and the row sums.

    Returns:
        (B, K, N). A normalised row whose sum is 0 (a lone point without its self term) gives 0.
        Non-finite inputs: see :func:`nonfinite_poison` (those channels are NaN).
    """
    pos = features.transpose(1, 2)  # (B, N, D)
    N = pos.shape[1]
    rows = []
    for start in range(0, N, _CHUNK):
        stop = min(N, start + _CHUNK)
        rows_pos = pos[:, start:stop]
        # |f_i - f_j|^2 = |f_i|^2 + |f_j|^2 - 2 f_i.f_j (clamped at 0 against rounding)
        d2 = (rows_pos.pow(2).sum(-1, keepdim=True) + pos.pow(2).sum(-1).unsqueeze(1)
              - 2 * rows_pos @ pos.transpose(1, 2)).clamp_min(0)  # (B, n, N)
        w = torch.exp(-0.5 * d2)
        if not include_self:
            idx = torch.arange(start, stop, device=w.device)
            w = w.clone()
            w[:, idx - start, idx] = 0
        out = torch.einsum("bij,bkj->bki", w, values)
        if normalize:
            den = w.sum(-1).unsqueeze(1)
            out = torch.where(den <= 1e-20, out * 0, out / den.clamp_min(1e-20))  # NaN stays NaN
        rows.append(out)
    return torch.cat(rows, dim=2) * nonfinite_poison(values, features)


def _exact_filter(values: torch.Tensor, features: torch.Tensor, normalize: bool, include_self: bool) -> torch.Tensor:
    return permutohedral_filter_reference(values, features, normalize=normalize, include_self=include_self)


def crf_features(image: torch.Tensor, sxy: float, srgb: float | None = None) -> torch.Tensor:
    """Features of a CRF kernel: (x/sxy, y/sxy) and, when ``srgb`` is given, (r, g, b)/srgb.

    Args:
        image: (B, 3, H, W) float, 0..255 (only its shape is used when ``srgb`` is None).
    Returns:
        (B, 2, H*W) or (B, 5, H*W) in ``image``'s dtype; x is the column, y the row index.
    """
    B, _, H, W = image.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=image.device, dtype=image.dtype),
                            torch.arange(W, device=image.device, dtype=image.dtype), indexing="ij")
    xy = torch.stack([xs, ys]).reshape(1, 2, H * W).expand(B, 2, H * W) / sxy
    if srgb is None:
        return xy.contiguous()
    return torch.cat([xy, image.reshape(B, 3, H * W) / srgb], dim=1).contiguous()


# ----------------------------------------------------------------------------------------------
# CRF energy ("reg") loss, docs/method.md 4.5
# ----------------------------------------------------------------------------------------------

def energy_inputs(images: torch.Tensor, probs: torch.Tensor, roi: torch.Tensor, label: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resize the loss inputs by ``scale`` (docs/method.md 4.5): image, ROI and label nearest, probabilities bilinear.

    Returns:
        image (B, 3, h, w), probs (B, K, h, w), roi (B, h, w), ignore (B, h, w) bool (label == 255).
    """
    img = F.interpolate(images, scale_factor=scale, mode="nearest")
    seg = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)
    roi_s = F.interpolate(roi.unsqueeze(1).to(probs.dtype), scale_factor=scale, mode="nearest").squeeze(1)
    lab = F.interpolate(label.unsqueeze(1).to(torch.float32), scale_factor=scale, mode="nearest").squeeze(1)
    return img, seg, roi_s, lab.round().long() == IGNORE_INDEX


class DenseEnergyFunction(torch.autograd.Function):
    """E = -sum(S * AS * Gate) / B with AS = W S, and the reference's gradient dE/dS = -2 * AS * Gate / B * ROI.

    S (B, K, h, w) are the (resized) probabilities, ``roi`` (B, h, w), ``ignore`` (B, h, w) bool, ``features``
    (B, 5, h*w); ``filter_fn`` computes W S (unnormalised, self term included).
    """

    @staticmethod
    def forward(ctx, seg, roi, ignore, features, filter_fn):
        B, K, h, w = seg.shape
        roi = roi.unsqueeze(1)
        gate = (roi - seg.max(dim=1, keepdim=True).values).clamp_min(0)
        gate = torch.where(ignore.unsqueeze(1), torch.ones_like(gate), gate)  # docs/method.md 4.5: 1 on ignored pixels
        s = seg * roi
        as_ = filter_fn(s.reshape(B, K, h * w).contiguous(), features, False, True).reshape(B, K, h, w)
        energy = -(s * as_ * gate).sum() / B
        ctx.save_for_backward(as_ * gate * roi)
        ctx.batch = B
        return energy

    @staticmethod
    def backward(ctx, grad):
        (as_gate_roi,) = ctx.saved_tensors
        return -2.0 * grad * as_gate_roi / ctx.batch, None, None, None, None


def dense_energy_loss_with(filter_fn: FilterFn, images: torch.Tensor, probs: torch.Tensor, roi: torch.Tensor,
                           label: torch.Tensor, *, sigma_rgb: float, sigma_xy: float, scale: float,
                           weight: float) -> torch.Tensor:
    """The loss of docs/method.md 4.5 with a given filter (exact here, the lattice in tscd.kernels.permutohedral)."""
    img, seg, roi_s, ignore = energy_inputs(images, probs, roi, label, scale)
    feats = crf_features(img.detach().to(seg.dtype), sigma_xy * scale, sigma_rgb)
    return weight * DenseEnergyFunction.apply(seg, roi_s, ignore, feats, filter_fn)


def dense_energy_loss_reference(images: torch.Tensor, probs: torch.Tensor, roi: torch.Tensor, label: torch.Tensor, *,
                                sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale: float = 0.5,
                                weight: float = 1e-7) -> torch.Tensor:
    """The CRF energy loss of docs/method.md 4.5 with the exact dense Gaussian (see tscd.kernels.dense_energy_loss)."""
    return dense_energy_loss_with(_exact_filter, images, probs, roi, label, sigma_rgb=sigma_rgb, sigma_xy=sigma_xy,
                                  scale=scale, weight=weight)


# ----------------------------------------------------------------------------------------------
# Mean-field dense CRF, docs/method.md 6
# ----------------------------------------------------------------------------------------------

#: Unary clipping of docs/method.md 6: U = -log(clip(p, 1e-5)).
PROB_CLIP = 1e-5


def mean_field(unary: torch.Tensor, kernels: list[tuple[torch.Tensor, float]], num_iter: int,
               filter_fn: FilterFn) -> torch.Tensor:
    """Mean-field inference of docs/method.md 6 (Kraehenbuehl & Koltun 2011, Potts model, symmetric normalisation).

    Q = softmax(-U); then ``num_iter`` times Q = softmax(-U + sum_k w_k D_k^-1/2 K_k D_k^-1/2 Q), D_k = diag(K_k 1).
    The message favours agreeing labels: with Potts compatibility w [l != l'], the expected penalty of label l is
    w sum_j K_ij (1 - Q_j(l)), i.e. a constant minus w (K Q)(l).

    Args:
        unary: (B, K, N) energies U.
        kernels: (features (B, D, N), w) per kernel.
    Returns:
        (B, K, N) marginals Q.
    """
    norms = []
    for feats, _ in kernels:
        ones = torch.ones_like(unary[:, :1])
        norms.append(filter_fn(ones, feats, False, True).clamp_min(1e-20).rsqrt())
    q = torch.softmax(-unary, dim=1)
    for _ in range(num_iter):
        msg = torch.zeros_like(unary)
        for (feats, w), n in zip(kernels, norms):
            msg = msg + w * n * filter_fn((q * n).contiguous(), feats, False, True)
        q = torch.softmax(-unary + msg, dim=1)
    return q


def dense_crf_with(filter_fn: FilterFn, image: torch.Tensor, probs: torch.Tensor, *, num_iter: int,
                   gauss_sxy: float, gauss_compat: float, bilateral_sxy: float, bilateral_srgb: float,
                   bilateral_compat: float, fused: Callable | None = None) -> torch.Tensor:
    """Dense CRF of docs/method.md 6 with a given filter; image (B, 3, H, W) float 0..255, probs (B, K, H, W).

    ``fused(unary, kernels, num_iter)``, if given, replaces :func:`mean_field` (the C++/CUDA op that runs the
    same loop with each lattice built once).
    """
    B, K, H, W = probs.shape
    unary = -torch.log(probs.clamp_min(PROB_CLIP)).reshape(B, K, H * W)
    img = image.to(probs.dtype)
    kernels = []
    if gauss_compat != 0:
        kernels.append((crf_features(img, gauss_sxy), float(gauss_compat)))
    if bilateral_compat != 0:
        kernels.append((crf_features(img, bilateral_sxy, bilateral_srgb), float(bilateral_compat)))
    if fused is not None:
        return fused(unary, kernels, num_iter).reshape(B, K, H, W)
    return mean_field(unary, kernels, num_iter, filter_fn).reshape(B, K, H, W)


def dense_crf_reference(image: torch.Tensor, probs: torch.Tensor, *, num_iter: int = 10, gauss_sxy: float = 3.0,
                        gauss_compat: float = 3.0, bilateral_sxy: float = 64.0, bilateral_srgb: float = 5.0,
                        bilateral_compat: float = 4.0) -> torch.Tensor:
    """Mean-field dense CRF of docs/method.md 6 with exact dense kernels (see tscd.kernels.dense_crf)."""
    return dense_crf_with(_exact_filter, image, probs, num_iter=num_iter, gauss_sxy=gauss_sxy,
                          gauss_compat=gauss_compat, bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb,
                          bilateral_compat=bilateral_compat)
