"""refine: VARM (TSCD) and PAR (AFA) pixel-adaptive refinement of class maps, docs/method.md 4.1.

For every pixel p of an image I (3 channels, [0, 1]) and its n = 8 * len(dilations) neighbours
q_o = clamp(p + d * o) (3x3 offsets without the centre, dilation-major, replicate border):

    a_o(p) = -mean_c[(rgb_scale * |I_c(p) - I_c(q_o)| / (sigma_c(p) + 1e-8))^2]
    varm:  w_o(p) = softmax_o(a)  - aux_weight * softmax_o(v),  v_o = squared forward differences
                                                                 of the shifted image at p
    par:   w_o(p) = softmax_o(a)  + aux_weight * softmax_o(position prior)
    then num_iter times, per channel:  M(p) <- sum_o w_o(p) * M(q_o)

after ``M`` was resized to the image size (bilinear, align_corners=True).

Backends: ``cuda``, ``triton``, ``cpp`` (fused: the n weights are computed once per pixel, then the
steps move only (weights, M); no n-fold copy of the image or the maps; on the CPU every loop runs over
16 pixels of a row at a time, on rows padded by the largest dilation so that no neighbour index needs a
clamp, and the transposed step of the backward is a gather per output row) and ``torch`` (the reference,
tscd/kernels/reference/refine.py). The C++/CUDA kernels' float32 softmaxes use a polynomial exp (within
~1 ulp of ``exp``): results match the reference to float32 rounding; float64 runs use ``exp`` itself.
Gradients: w.r.t. ``cam`` on every backend (the fused backward recomputes the weights and applies the
transposed propagation); w.r.t. ``image`` only with ``backend="torch"``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tscd.kernels import _backend, _checks, _ext
from tscd.kernels.reference.refine import DEFAULT_DILATIONS, position_prior, refine_reference, refine_weights_reference

OP = "refine"
SUPPORTED_BACKENDS: tuple[str, ...] = ("triton", "cuda", "cpp", "torch")
MODES = {"varm": 0, "par": 1}
MAX_DILATIONS = 16


def _mode_constants(mode: str, rgb_scale: float | None, aux_weight: float) -> tuple[int, float, float]:
    """(mode id, rgb_scale, signed aux weight) as the kernels take them."""
    if mode not in MODES:
        raise ValueError(f"{OP}: `mode` must be 'varm' or 'par'; got {mode!r}")
    if rgb_scale is None:
        rgb_scale = 4.0 if mode == "varm" else 1.0 / 0.3
    signed_aux = -float(aux_weight) if mode == "varm" else float(aux_weight)
    return MODES[mode], float(rgb_scale), signed_aux


def _check_common(image: torch.Tensor, dilations: Sequence[int], mode: str) -> tuple[int, ...]:
    _checks.check_tensor(OP, "image", image, ndim=4, layout="(B, 3, H, W)")
    _checks.check_dim(OP, "image", image, 1, 3, "3 channels (RGB in [0, 1])")
    dil = _checks.check_positive_ints(OP, "dilations", dilations)
    if len(dil) > MAX_DILATIONS:
        raise ValueError(f"{OP}: at most {MAX_DILATIONS} dilations are supported; got {len(dil)}")
    if mode not in MODES:
        raise ValueError(f"{OP}: `mode` must be 'varm' or 'par'; got {mode!r}")
    return dil


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Fused kernels run in float32 (float64 kept for gradcheck); half types are upcast."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def refine(image: torch.Tensor, cam: torch.Tensor, *, dilations: Sequence[int] = DEFAULT_DILATIONS,
           num_iter: int = 10, mode: str = "varm", rgb_scale: float | None = None, aux_weight: float = 0.01,
           pos_scale: float = 0.3, num_channels: Sequence[int] | torch.Tensor | None = None,
           backend: str = "auto") -> torch.Tensor:
    """Refine class maps with image-guided propagation (VARM or PAR), docs/method.md 4.1.

    Several maps of one image share its weights: to refine both background thresholds of the
    pseudo labels, concatenate them along K and make one call for the whole batch. Images with
    fewer valid channels than K pass ``num_channels``: the remaining channels are skipped and
    returned as 0.

    Args:
        image: (B, 3, H, W) float image in [0, 1] (de-normalised), any float dtype.
        cam: (B, K, h, w) float maps (CAMs, probabilities...), same device; resized to (H, W)
            bilinearly with align_corners=True first (skipped when already (H, W)).
        dilations: dilations of the 3x3 neighbourhood (1 to 16 values), default (1, 2, 4, 8, 12, 24).
        num_iter: propagation steps (>= 0; 0 returns the resized maps).
        mode: ``"varm"`` (TSCD: appearance - variation) or ``"par"`` (AFA: appearance + position).
        rgb_scale: factor of the appearance term; default 4 (varm) or 1/0.3 (par).
        aux_weight: weight of the second term (0.01): varm subtracts it, par adds it.
        pos_scale: PAR's position scale (0.3); unused by varm.
        num_channels: optional per-image count of valid channels (B ints in [0, K]). A sequence or a tensor on
            another device is checked on the host; an integer tensor already on ``cam``'s device is used without a
            host sync (values outside [0, K] are clamped, not reported).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"`` (see tscd.kernels).

    Returns:
        (B, K, H, W) refined maps in ``cam``'s dtype. Inputs are made contiguous as needed.

    Non-finite inputs: propagated as the reference does, on every backend (no check, no host sync): a NaN
    or +-inf in ``image`` makes the weights of the pixels whose neighbourhood holds it NaN, and each step
    spreads NaN from there to every channel; a NaN/inf in ``cam`` spreads through its own channel;
    skipped channels (``num_channels``) are 0 regardless. No input value can make a kernel read out of bounds (the
    neighbour indices depend on positions only).

    Raises:
        TypeError: a non-float tensor. ValueError: bad shapes, devices or arguments, or ``image``
        requiring grad with a fused backend. RuntimeError: the requested backend cannot run here.
    """
    dil = _check_common(image, dilations, mode)
    _checks.check_tensor(OP, "cam", cam, ndim=4, layout="(B, K, h, w)")
    _checks.check_same_batch(OP, image=image, cam=cam)
    device = _checks.check_same_device(OP, image=image, cam=cam)
    if not isinstance(num_iter, int) or isinstance(num_iter, bool) or num_iter < 0:
        raise ValueError(f"{OP}: `num_iter` must be an int >= 0; got {num_iter!r}")
    B, K = cam.shape[:2]
    nc = _num_channels_tensor(num_channels, B, K, device)
    name = _backend.resolve_backend("refine_fwd", backend, device, SUPPORTED_BACKENDS)
    if name == "torch":
        return refine_reference(image, cam, dilations=dil, num_iter=num_iter, mode=mode, rgb_scale=rgb_scale,
                                aux_weight=aux_weight, pos_scale=pos_scale,
                                num_channels=nc)
    if image.requires_grad:
        raise ValueError(f"{OP}: gradients w.r.t. `image` are implemented by backend='torch' only (got backend "
                         f"{name!r}); pass image.detach() (the image is data in TSCD) or use backend='torch'")
    out_dtype = cam.dtype
    dtype = _compute_dtype(cam.dtype)
    H, W = image.shape[-2:]
    maps = cam.to(dtype)
    if maps.shape[-2:] != (H, W):
        maps = F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=True)
    if num_iter == 0:
        out = maps if nc is None else torch.where(_channel_mask(nc, K), maps, torch.zeros_like(maps))
        return out.to(out_dtype)
    img = image.detach().to(dtype).contiguous()
    maps = maps.contiguous()
    mode_id, scale, aux = _mode_constants(mode, rgb_scale, aux_weight)
    prior = position_prior(dil, pos_scale, dtype=dtype, device=device) if mode == "par" else None
    args = (list(dil), num_iter, mode_id, scale, aux, prior)
    if name == "triton":
        out = torch.ops.tscd.refine_fwd_triton(img, maps, nc, *args)
    else:
        out = torch.ops.tscd.refine_fwd(img, maps, nc, *args)
    return out.to(out_dtype)


def refine_weights(image: torch.Tensor, *, dilations: Sequence[int] = DEFAULT_DILATIONS, mode: str = "varm",
                   rgb_scale: float | None = None, aux_weight: float = 0.01, pos_scale: float = 0.3,
                   backend: str = "auto") -> torch.Tensor:
    """The propagation weights alone (for inspection and tests): (B, 3, H, W) -> (B, n, H, W).

    Same arguments as :func:`refine`. They sum to 1 - aux_weight (varm) or 1 + aux_weight (par) per pixel.
    No gradient on the fused backends.
    """
    dil = _check_common(image, dilations, mode)
    device = image.device
    name = _backend.resolve_backend("refine_weights", backend, device, SUPPORTED_BACKENDS)
    if name == "torch":
        return refine_weights_reference(image, dilations=dil, mode=mode, rgb_scale=rgb_scale,
                                        aux_weight=aux_weight, pos_scale=pos_scale)
    dtype = _compute_dtype(image.dtype)
    img = image.detach().to(dtype).contiguous()
    mode_id, scale, aux = _mode_constants(mode, rgb_scale, aux_weight)
    prior = position_prior(dil, pos_scale, dtype=dtype, device=device) if mode == "par" else None
    if name == "triton":
        from tscd.kernels._triton.refine import refine_weights_triton

        return refine_weights_triton(img, list(dil), mode_id, scale, aux, prior).to(dtype)
    return torch.ops.tscd.refine_weights(img, list(dil), mode_id, scale, aux, prior)


def _num_channels_tensor(num_channels, B: int, K: int, device: torch.device) -> torch.Tensor | None:
    if num_channels is None:
        return None
    if isinstance(num_channels, torch.Tensor) and num_channels.device == device and num_channels.dim() == 1 \
            and num_channels.shape[0] == B and not (num_channels.dtype.is_floating_point or
                                                    num_channels.dtype.is_complex or num_channels.dtype == torch.bool):
        # already on the device: no host-side check (it would sync); clamped to [0, K] there instead
        return num_channels.clamp(0, K).to(torch.int64).contiguous()
    nc = torch.as_tensor(num_channels)
    if nc.dtype.is_floating_point or nc.dtype == torch.bool or nc.dim() != 1 or nc.shape[0] != B:
        raise ValueError(f"{OP}: `num_channels` must hold one int per image (B={B}); got {num_channels!r}")
    if bool((nc < 0).any()) or bool((nc > K).any()):
        raise ValueError(f"{OP}: `num_channels` must lie in [0, K={K}]; got {nc.tolist()}")
    return nc.to(device=device, dtype=torch.int64).contiguous()


def _channel_mask(nc: torch.Tensor, K: int) -> torch.Tensor:
    """(B, K, 1, 1) bool: the valid channels (skipped ones are returned as 0, even when they hold NaN)."""
    keep = torch.arange(K, device=nc.device).view(1, K) < nc.view(-1, 1)
    return keep.view(nc.shape[0], K, 1, 1)


# ---------------------------------------------------------------------------------------------
# Op registrations: fake kernels (shapes for torch.compile) and autograd for the C++/CUDA ops of
# tscd._C, and the Triton path as a torch.library.custom_op with the same treatment.
# ---------------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    image, _cam, num_channels, dilations, num_iter, mode, rgb_scale, aux_weight, prior = inputs
    ctx.save_for_backward(image, num_channels, prior)
    ctx.params = (dilations, num_iter, mode, rgb_scale, aux_weight)


def _make_backward(bwd_op):
    def backward(ctx, grad):
        image, num_channels, prior = ctx.saved_tensors
        dilations, num_iter, mode, rgb_scale, aux_weight = ctx.params
        grad_cam = None
        if ctx.needs_input_grad[1]:
            grad_cam = bwd_op(grad.contiguous(), image, num_channels, dilations, num_iter, mode, rgb_scale,
                              aux_weight, prior)
        return None, grad_cam, None, None, None, None, None, None, None

    return backward


def _register_cpp_ops() -> None:
    @torch.library.register_fake("tscd::refine_weights")
    def _weights_fake(image, dilations, mode, rgb_scale, aux_weight, prior):
        B, _, H, W = image.shape
        return image.new_empty(B, 8 * len(dilations), H, W)

    @torch.library.register_fake("tscd::refine_fwd")
    def _fwd_fake(image, cam, num_channels, dilations, num_iter, mode, rgb_scale, aux_weight, prior):
        return torch.empty_like(cam)

    @torch.library.register_fake("tscd::refine_bwd")
    def _bwd_fake(grad_out, image, num_channels, dilations, num_iter, mode, rgb_scale, aux_weight, prior):
        return torch.empty_like(grad_out)

    torch.library.register_autograd("tscd::refine_fwd", _make_backward(torch.ops.tscd.refine_bwd),
                                    setup_context=_setup_context)


@torch.library.custom_op("tscd::refine_fwd_triton", mutates_args=())
def _refine_fwd_triton(image: torch.Tensor, cam: torch.Tensor, num_channels: torch.Tensor | None,
                       dilations: list[int], num_iter: int, mode: int, rgb_scale: float, aux_weight: float,
                       prior: torch.Tensor | None) -> torch.Tensor:
    from tscd.kernels._triton.refine import refine_fwd_triton

    return refine_fwd_triton(image, cam, num_channels, dilations, num_iter, mode, rgb_scale, aux_weight, prior)


@torch.library.custom_op("tscd::refine_bwd_triton", mutates_args=())
def _refine_bwd_triton(grad_out: torch.Tensor, image: torch.Tensor, num_channels: torch.Tensor | None,
                       dilations: list[int], num_iter: int, mode: int, rgb_scale: float, aux_weight: float,
                       prior: torch.Tensor | None) -> torch.Tensor:
    from tscd.kernels._triton.refine import refine_bwd_triton

    return refine_bwd_triton(grad_out, image, num_channels, dilations, num_iter, mode, rgb_scale, aux_weight, prior)


@_refine_fwd_triton.register_fake
def _(image, cam, num_channels, dilations, num_iter, mode, rgb_scale, aux_weight, prior):
    return torch.empty_like(cam)


@_refine_bwd_triton.register_fake
def _(grad_out, image, num_channels, dilations, num_iter, mode, rgb_scale, aux_weight, prior):
    return torch.empty_like(grad_out)


_refine_fwd_triton.register_autograd(_make_backward(_refine_bwd_triton), setup_context=_setup_context)

if _ext.has_cpp():
    _register_cpp_ops()
