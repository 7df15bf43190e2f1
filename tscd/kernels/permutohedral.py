"""permutohedral: Gaussian filtering on a permutohedral lattice, the CRF energy loss (docs/method.md 4.5) and
mean-field dense-CRF inference (docs/method.md 6).

The filter computes, for values V (B, K, N) and features f (B, D, N) (each feature divided by its sigma),

    out[b, k, i] = sum_j W_ij V[b, k, j],   W_ij = exp(-|f_i - f_j|^2 / 2)   (self term W_ii = 1)

optionally without the self term and/or normalised by sum_j W_ij. The fused backends approximate W with
the permutohedral lattice of Adams, Baek & Davis (2010): splat onto the vertices of the enclosing simplex
of the lattice in R^{D+1}, blur [1 2 1]/4 along the D+1 lattice directions, slice (csrc/permutohedral.h).
The hash table of an image is built once and reused for all K channels.

Calibration: the lattice's kernel integrates to the Gaussian's over full-dimensional point clouds (the
factor c_D = 1 / (sqrt(D+1) (4 pi / 3)^(D/2)) is divided out; measured mass 1.00, variance 0.97-1.02 per
dimension), but its shape is not exactly Gaussian, so on image features (a 2-D manifold in 5-D) the
unnormalised output is typically 0.7-0.85x the exact sum; the normalised variant (and dense-CRF, whose
symmetric normalisation cancels any gain) is within about 1-2 %. Measured figures: tests/kernels/
test_permutohedral.py and bench/results/permutohedral-*.md. The CRF loss (``dense_energy_loss``) defaults to
the gain of the field's lattice instead (``gain="field"``: ours x :func:`field_gain`, 1 / 1.417363 at D = 5),
the one its official weight was tuned on; ``gain="exact"`` keeps this calibration.

The self term: ``include_self=False`` subtracts exactly v_i (the exact W_ii = 1), not the lattice's own
self weight, which depends on where the point lies in its simplex: for a lone point its median is 0.63 at D = 5
(5-95 % 0.55-0.82) and 0.74 at D = 2 (0.70-0.87), and it is below 1 at over 99 % of positions. So on points
that are isolated in feature space the excluded-self output removes more than the lattice gave (a negative
value); normalised, the row sum minus 1 is then at or below zero: such a point gives 0, and points near that
edge are ill-conditioned (their float32 digits depend on the summation order, which differs between backends).
The ``torch`` backend is exact.

Backends: ``cuda`` (GPU hash table, no host sync), ``cpp`` (OpenMP over images and channels) and ``torch``
(the exact dense filter, tscd/kernels/reference/permutohedral.py; at most 16384 points per image).
``dense_crf`` on cpp/cuda runs the op ``tscd::dense_crf_fwd``: the reference's mean-field loop with each
kernel's lattice built once for all iterations. On the CPU the loop is fused: every buffer keeps the K channels
of a point or vertex contiguous (K padded to a multiple of 8, SIMD over channels); each thread runs the splat
and all blur passes of its group of channels (no barrier between passes), then one pass over the points, split
across threads, slices both kernels, adds the messages and takes the softmax (torch's intra-op threads:
``torch.set_num_threads``). It gives pydensecrf's labels (DenseCRF2D with the same settings) on every pixel of
the test and benchmark images (tests/kernels/test_dense_crf_pydensecrf.py); timings against it:
bench/bench_permutohedral.py ``--cases voc``.
Gradients: w.r.t. ``values`` on every backend (the fused backward applies the transposed lattice: the
blur directions in reverse order); w.r.t. ``features`` only with ``backend="torch"``.

Non-finite inputs (the same on every backend, on the device, no host sync): a NaN or +-inf in
``values[b, k]`` makes output channel (b, k) NaN; a NaN, +-inf or out-of-range (|f| > 2^20 standard
deviations, MAX_FEATURE) feature of image b makes all of image b's outputs NaN; the gradient w.r.t. those
channels' values is NaN too. The C++/CUDA lattice never builds an out-of-range key from such a point (it is
embedded at the origin with NaN weights). ``dense_energy_loss`` inherits this (a NaN loss); ``dense_crf``, an
inference op, raises ValueError instead.
"""
from __future__ import annotations

import math

import torch

from tscd.kernels import _backend, _checks, _ext
from tscd.kernels.reference.permutohedral import (
    MAX_DENSE_POINTS,
    MAX_FEATURE,
    dense_crf_with,
    dense_energy_loss_with,
    nonfinite_poison,
    permutohedral_filter_reference,
)

OP = "permutohedral_filter"
SUPPORTED_BACKENDS: tuple[str, ...] = ("cuda", "cpp", "torch")
MAX_FEATURES = 8


#: ``gain`` choices of :func:`dense_energy_loss`.
CRF_GAINS: tuple[str, ...] = ("field", "exact")


def field_gain(d: int = 5) -> float:
    """The field's lattice gain relative to ours (exact-Gaussian calibration) for ``d`` feature dimensions.

    The field's filter (rloss's ``bilateralfilter``, i.e. Kraehenbuehl's ``permutohedral.cpp``, which AFA and
    TSCD train with) has our lattice's geometry, splat and slice, but blurs each of the d + 1 directions with
    ``v + (n1 + n2) / 2`` (2x our normalised [1 2 1] / 4: 2^(d+1) in all) and scales the slice by
    ``alpha = 1 / (1 + 2^-d)``, where we divide by ``c_d = 1 / (sqrt(d + 1) (4 pi / 3)^(d / 2))``. So
    field / ours = 2^(d+1) alpha c_d; at d = 5: 2048 / (33 sqrt(6) (4 pi / 3)^2.5) = 1 / 1.417363.
    """
    alpha = 1.0 / (1.0 + 2.0 ** -d)
    c_d = 1.0 / (math.sqrt(d + 1) * (4.0 * math.pi / 3.0) ** (d / 2))
    return 2.0 ** (d + 1) * alpha * c_d


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dense_size(op: str, n: int, what: str) -> None:
    if n > MAX_DENSE_POINTS:
        raise ValueError(f"{op}: backend='torch' is the exact O(N^2) dense filter and takes at most "
                         f"MAX_DENSE_POINTS={MAX_DENSE_POINTS} points per image; got {what} = {n}. Use "
                         "backend='cpp' (CPU) or 'cuda' (GPU), or a smaller input")


def permutohedral_filter(values: torch.Tensor, features: torch.Tensor, *, normalize: bool = False,
                         include_self: bool = True, backend: str = "auto") -> torch.Tensor:
    """Gaussian filtering of ``values`` in the space of ``features`` (permutohedral lattice).

    Args:
        values: (B, K, N) float values (class probabilities...), any float dtype.
        features: (B, D, N) float features, same device, 1 <= D <= 8, each already divided by its
            standard deviation (e.g. (x/50, y/50, r/15, g/15, b/15)): the kernel is exp(-|f_i - f_j|^2 / 2).
        normalize: divide by sum_j W_ij (a weighted average) instead of returning the plain sum.
        include_self: include the self term W_ii = 1 (the CRF loss does); False subtracts it (and from
            the normalising sum; on isolated points see the module docstring). A normalised row whose sum is
            <= 1e-20 gives 0.
        backend: ``"auto"``, ``"cuda"``, ``"cpp"`` or ``"torch"`` (exact, N <= 16384).

    Returns:
        (B, K, N) in ``values``' dtype (computed in float32, or float64 for float64 inputs).

    Non-finite inputs: a NaN/inf value makes its output channel NaN; a NaN/inf feature, or one beyond
    +-2^20 (``MAX_FEATURE``), makes its image's outputs NaN; every backend alike (see the module docstring).

    Raises:
        TypeError: a non-float tensor. ValueError: bad shapes or devices, too many points for the torch
        backend, or ``features`` requiring grad with a fused backend. RuntimeError: the backend cannot run here.
    """
    _checks.check_tensor(OP, "values", values, ndim=3, layout="(B, K, N)")
    _checks.check_tensor(OP, "features", features, ndim=3, layout="(B, D, N)")
    _checks.check_same_batch(OP, values=values, features=features)
    device = _checks.check_same_device(OP, values=values, features=features)
    if values.shape[2] != features.shape[2]:
        raise ValueError(f"{OP}: `values` (B, K, N) and `features` (B, D, N) must have the same N; got "
                         f"{tuple(values.shape)} and {tuple(features.shape)}")
    if not 1 <= features.shape[1] <= MAX_FEATURES:
        raise ValueError(f"{OP}: `features` must have 1 to {MAX_FEATURES} feature dimensions (dim 1); got shape "
                         f"{tuple(features.shape)}")
    name = _backend.resolve_backend("permutohedral_fwd", backend, device, SUPPORTED_BACKENDS)
    return _filter(name, values, features, bool(normalize), bool(include_self))


def _filter(name: str, values: torch.Tensor, features: torch.Tensor, normalize: bool,
            include_self: bool) -> torch.Tensor:
    """The filter on a resolved backend (arguments already checked)."""
    if name == "torch":
        _check_dense_size(OP, values.shape[2], "N")
        return permutohedral_filter_reference(values, features, normalize=normalize, include_self=include_self)
    if features.requires_grad:
        raise ValueError(f"{OP}: gradients w.r.t. `features` are implemented by backend='torch' only (got backend "
                         f"{name!r}); pass features.detach() (they are image data in TSCD) or use backend='torch'")
    dtype = _compute_dtype(values.dtype)
    v, f = values.to(dtype).contiguous(), features.detach().to(dtype).contiguous()
    out = torch.ops.tscd.permutohedral_fwd(v, f, normalize, include_self) * nonfinite_poison(v, f)
    return out.to(values.dtype)


def _filter_fn(name: str):
    def fn(values, features, normalize, include_self):
        return _filter(name, values, features, normalize, include_self)

    return fn


def _check_position_range(op: str, side: int, sxy: float, what: str) -> None:
    """The position features (x, y) / sxy must stay within the lattice's range (host arithmetic only)."""
    if (side - 1) / sxy > MAX_FEATURE:
        raise ValueError(f"{op}: `{what}` = {sxy:g} is too small for a {side}-pixel side: the position features "
                         f"reach {(side - 1) / sxy:.3g}, beyond the lattice's range 2^20")


def _check_image(op: str, name: str, image: torch.Tensor, batched_only: bool) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a tensor (B, 3, H, W) with values 0..255; got {type(image).__name__}")
    if image.dtype == torch.bool or image.is_complex():
        raise TypeError(f"{op}: `{name}` must be uint8 or float (0..255); got dtype "
                        f"{str(image.dtype).replace('torch.', '')}")
    if image.dim() == 3 and not batched_only:
        image = image.unsqueeze(0)
    layout = "(B, 3, H, W)" if batched_only else "(3, H, W) or (B, 3, H, W)"
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"{op}: `{name}` must be {layout} with values 0..255; got shape {tuple(image.shape)}")
    if image.numel() == 0:
        raise ValueError(f"{op}: `{name}` must not be empty; got shape {tuple(image.shape)}")
    return image


def dense_energy_loss(images: torch.Tensor, probs: torch.Tensor, roi: torch.Tensor, label: torch.Tensor, *,
                      sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale: float = 0.5, weight: float = 1e-7,
                      gain: str = "field", backend: str = "auto") -> torch.Tensor:
    """CRF energy ("reg") loss of Tang et al., docs/method.md 4.5, on the inputs' device (no host sync on GPU).

    Gain: ``"field"`` (default) has the gain of the field's lattice (rloss / Kraehenbuehl), on which the
    official weight 0.01 was tuned: our lattice's loss times :func:`field_gain` (= 1 / 1.417363 for the 5-D
    features), exact in value and gradient, since the two lattices differ only by that constant. ``"exact"``
    keeps the exact-Gaussian calibration (the lattice approximates sum_j exp(-|f_i - f_j|^2 / 2) S_j; on real
    images the field's loss is 0.51-0.61x of that exact sum). With ``backend="torch"`` (the exact dense filter)
    ``"field"`` applies the same constant to the exact sum, so it matches the lattice backends only as closely
    as the lattice matches the exact Gaussian.

    At ``scale`` (0.5): image, ROI and label resized nearest, ``probs`` bilinear (S). Then
    Gate = max(ROI - max_k S, 0), 1 on ignored (255) pixels; S <- S * ROI; AS = W S (features
    (x, y)/(sigma_xy * scale), (r, g, b)/sigma_rgb; unnormalised, self term included);
    loss = weight * (-sum(S * AS * Gate) / B), with the reference's gradient -2 * AS * Gate / B * ROI.

    Args:
        images: (B, 3, H, W) float image, 0..255 (not normalised); no gradient.
        probs: (B, K, H, W) float softmax probabilities, same device; the gradient flows here.
        roi: (B, H, W) 1 inside the image box, 0 outside (any dtype).
        label: (B, H, W) integer (pseudo) labels; 255 = ignore.
        sigma_rgb, sigma_xy, scale, weight: docs/method.md 4.5 defaults 15, 100, 0.5, 1e-7.
        gain: ``"field"`` (default, the official gain) or ``"exact"`` (exact-Gaussian calibration).
        backend: ``"auto"``, ``"cuda"``, ``"cpp"`` or ``"torch"`` (exact, at most 16384 points after scaling).

    Returns:
        A 0-d tensor in ``probs``' dtype.

    Non-finite inputs: NaN or +-inf in ``images``, ``probs`` or ``roi`` give a NaN loss (and NaN gradients on
    the affected images), on every backend, without a host sync; so do image values beyond +-2^20 * sigma_rgb.

    Raises:
        TypeError / ValueError: bad dtypes, shapes or devices, non-finite or non-positive sigmas or scale, a
        non-finite weight. RuntimeError: the backend cannot run here.
    """
    op = "dense_energy_loss"
    images = _check_image(op, "images", images, batched_only=True)
    if not images.is_floating_point():
        images = images.float()
    _checks.check_tensor(op, "probs", probs, ndim=4, layout="(B, K, H, W)")
    _checks.check_tensor(op, "roi", roi, ndim=3, layout="(B, H, W)", floating=False)
    _checks.check_tensor(op, "label", label, ndim=3, layout="(B, H, W)", floating=False)
    if label.is_floating_point() or label.dtype == torch.bool:
        raise TypeError(f"{op}: `label` must be an integer tensor (B, H, W) with 255 = ignore; got dtype "
                        f"{str(label.dtype).replace('torch.', '')}")
    _checks.check_same_batch(op, images=images, probs=probs, roi=roi, label=label)
    device = _checks.check_same_device(op, images=images, probs=probs, roi=roi, label=label)
    size = tuple(probs.shape[-2:])
    for name, t in (("images", images), ("roi", roi), ("label", label)):
        if tuple(t.shape[-2:]) != size:
            raise ValueError(f"{op}: `{name}` must have the spatial size of `probs` {size}; got shape {tuple(t.shape)}")
    for name, v in (("sigma_rgb", sigma_rgb), ("sigma_xy", sigma_xy), ("scale", scale)):
        _checks.check_finite_scalar(op, name, v, positive=True)
    _checks.check_finite_scalar(op, "weight", weight)
    if gain not in CRF_GAINS:
        raise ValueError(f"{op}: `gain` must be one of {', '.join(CRF_GAINS)}; got {gain!r}")
    h, w = int(size[0] * scale), int(size[1] * scale)
    if h < 1 or w < 1:
        raise ValueError(f"{op}: the input {size} is empty at scale {scale}")
    _check_position_range(op, max(h, w), float(sigma_xy) * float(scale), "sigma_xy * scale")
    name = _backend.resolve_backend("permutohedral_fwd", backend, device, SUPPORTED_BACKENDS)
    if name == "torch":
        _check_dense_size(op, h * w, f"the scaled image's h*w ({h}x{w})")
    dtype = _compute_dtype(probs.dtype)
    loss = dense_energy_loss_with(_filter_fn(name), images.detach().to(dtype), probs.to(dtype), roi, label,
                                  sigma_rgb=float(sigma_rgb), sigma_xy=float(sigma_xy), scale=float(scale),
                                  weight=float(weight) * (field_gain(5) if gain == "field" else 1.0))
    return loss.to(probs.dtype)


def dense_crf(image: torch.Tensor, probs: torch.Tensor, *, num_iter: int = 10, gauss_sxy: float = 3.0,
              gauss_compat: float = 3.0, bilateral_sxy: float = 64.0, bilateral_srgb: float = 5.0,
              bilateral_compat: float = 4.0, backend: str = "auto") -> torch.Tensor:
    """Mean-field inference of a fully-connected CRF (Kraehenbuehl & Koltun 2011), the model of docs/method.md 6.

    U = -log(clip(p, 1e-5)); Q = softmax(-U); ``num_iter`` times Q = softmax(-U + sum_k w_k N_k(Q)) with
    N_k(Q) = D^-1/2 K_k D^-1/2 Q, D = diag(K_k 1), a Gaussian kernel on (x, y)/gauss_sxy (w = gauss_compat)
    and a bilateral kernel on (x, y)/bilateral_sxy, (r, g, b)/bilateral_srgb (w = bilateral_compat), Potts
    compatibility, self terms included (pydensecrf's DenseCRF2D defaults). No gradient is meant to flow.

    Args:
        image: (3, H, W) or (B, 3, H, W) uint8 or float image, 0..255, same device as ``probs``.
        probs: (B, K, H, W) float class probabilities (softmax), K >= 1.
        num_iter: mean-field iterations (>= 0). Other arguments: docs/method.md 6 defaults.
        backend: ``"auto"``, ``"cuda"``, ``"cpp"`` or ``"torch"`` (exact, H*W <= 16384).

    Returns:
        (B, K, H, W) marginals Q in ``probs``' dtype; ``Q.argmax(1)`` is the labelling.

    Non-finite inputs: rejected. A NaN or +-inf in ``image`` or ``probs``, or image values beyond
    +-2^20 * bilateral_srgb (the lattice's range), raise ValueError on every backend (this op checks its
    inputs on the host: it is an inference op, not on the training hot path).

    Raises:
        TypeError / ValueError: bad dtypes, shapes, devices or arguments, non-finite inputs.
        RuntimeError: the backend cannot run here.
    """
    op = "dense_crf"
    image = _check_image(op, "image", image, batched_only=False)
    _checks.check_tensor(op, "probs", probs, ndim=4, layout="(B, K, H, W)")
    if image.shape[0] == 1 and probs.shape[0] > 1:
        image = image.expand(probs.shape[0], -1, -1, -1)
    _checks.check_same_batch(op, image=image, probs=probs)
    device = _checks.check_same_device(op, image=image, probs=probs)
    if tuple(image.shape[-2:]) != tuple(probs.shape[-2:]):
        raise ValueError(f"{op}: `image` and `probs` must have the same (H, W); got {tuple(image.shape)} and "
                         f"{tuple(probs.shape)}")
    if not isinstance(num_iter, int) or isinstance(num_iter, bool) or num_iter < 0:
        raise ValueError(f"{op}: `num_iter` must be an int >= 0; got {num_iter!r}")
    for name, v in (("gauss_sxy", gauss_sxy), ("bilateral_sxy", bilateral_sxy), ("bilateral_srgb", bilateral_srgb)):
        _checks.check_finite_scalar(op, name, v, positive=True)
    for name, v in (("gauss_compat", gauss_compat), ("bilateral_compat", bilateral_compat)):
        _checks.check_finite_scalar(op, name, v)
    _checks.check_finite(op, "image", image)
    _checks.check_finite(op, "probs", probs)
    side = max(probs.shape[2], probs.shape[3])
    if float(gauss_compat) != 0:
        _check_position_range(op, side, float(gauss_sxy), "gauss_sxy")
    if float(bilateral_compat) != 0:
        _check_position_range(op, side, float(bilateral_sxy), "bilateral_sxy")
        peak = float(image.abs().max()) if image.is_floating_point() else float(image.max())
        if peak / float(bilateral_srgb) > MAX_FEATURE:
            raise ValueError(f"{op}: `image` values up to {peak:g} give colour features |value| / bilateral_srgb = "
                             f"{peak / float(bilateral_srgb):.3g}, beyond the lattice's range 2^20; image values are "
                             "0..255")
    name = _backend.resolve_backend("permutohedral_fwd", backend, device, SUPPORTED_BACKENDS)
    if name == "torch":
        _check_dense_size(op, probs.shape[2] * probs.shape[3], "H*W")
    dtype = _compute_dtype(probs.dtype)
    kw = dict(num_iter=num_iter, gauss_sxy=float(gauss_sxy), gauss_compat=float(gauss_compat),
              bilateral_sxy=float(bilateral_sxy), bilateral_srgb=float(bilateral_srgb),
              bilateral_compat=float(bilateral_compat))
    with torch.no_grad():
        if name == "torch":
            q = dense_crf_with(_filter_fn(name), image.to(dtype), probs.to(dtype), **kw)
        else:  # the same model in one op: each kernel's lattice is built once for all iterations
            q = dense_crf_with(_filter_fn(name), image.to(dtype), probs.to(dtype), fused=_fused_mean_field, **kw)
    return q.to(probs.dtype)


def _fused_mean_field(unary: torch.Tensor, kernels: list[tuple[torch.Tensor, float]], num_iter: int) -> torch.Tensor:
    if not kernels:
        return torch.softmax(-unary, dim=1)
    return torch.ops.tscd.dense_crf_fwd(unary.contiguous(), [f.contiguous() for f, _ in kernels],
                                        [float(w) for _, w in kernels], num_iter)


# ---------------------------------------------------------------------------------------------
# Op registrations: fake kernels (shapes for torch.compile) and autograd for the C++/CUDA ops.
# ---------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    _values, features, normalize, include_self = inputs
    ctx.save_for_backward(features)
    ctx.params = (normalize, include_self)


def _backward(ctx, grad):
    (features,) = ctx.saved_tensors
    normalize, include_self = ctx.params
    grad_values = None
    if ctx.needs_input_grad[0]:
        grad_values = torch.ops.tscd.permutohedral_bwd(grad.contiguous(), features, normalize, include_self)
    return grad_values, None, None, None


def _register_cpp_ops() -> None:
    @torch.library.register_fake("tscd::permutohedral_fwd")
    def _fwd_fake(values, features, normalize, include_self):
        return torch.empty_like(values)

    @torch.library.register_fake("tscd::permutohedral_bwd")
    def _bwd_fake(grad_out, features, normalize, include_self):
        return torch.empty_like(grad_out)

    @torch.library.register_fake("tscd::dense_crf_fwd")
    def _crf_fake(unary, features, weights, num_iter):
        return torch.empty_like(unary)

    torch.library.register_autograd("tscd::permutohedral_fwd", _backward, setup_context=_setup_context)


if _ext.has_cpp():
    _register_cpp_ops()
