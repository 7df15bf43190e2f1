"""Triton kernels of ``refine`` (VARM / PAR, docs/method.md 4.1); the math mirrors csrc/refine.h.

One program handles BLOCK pixels of one image (weights) or of one (image, channel) plane
(propagation). Neighbour shifts (dy, dx) come precomputed from the host as int32 arrays, so any
dilation list works. The transpose (backward) scatters with atomic adds.
Tile heuristic: BLOCK = 256 pixels, 4 warps on a GPU (no autotune: it fails in the interpreter and
makes timings noisy); in the CPU interpreter one block spans up to 4096 pixels, since there the cost is
per program and per loop step, not per pixel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tscd.kernels._triton._launch import device_guard

BLOCK = 256
NUM_WARPS = 4
INTERPRET_MAX_BLOCK = 4096
STD_EPS = 1e-8  # added to the local standard deviation (as the reference)
_STD_EPS = tl.constexpr(STD_EPS)  # what the kernels read: compiled @triton.jit sees constexpr globals only


@triton.jit
def _load_rgb(img, HW, q, mask):
    """The 3 channels of pixels ``q`` of one image, as float32."""
    c0 = tl.load(img + q, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(img + HW + q, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(img + 2 * HW + q, mask=mask, other=0.0).to(tl.float32)
    return c0, c1, c2


@triton.jit
def _clamped(y, x, sy, sx, H, W):
    """Row and column of the neighbour (y + sy, x + sx), clamped to the image (replicate border)."""
    return tl.minimum(tl.maximum(y + sy, 0), H - 1), tl.minimum(tl.maximum(x + sx, 0), W - 1)


@triton.jit
def _variation(img, HW, H, W, qy, qx, yd, xr, sy, sx, n0, n1, n2, mask):
    """VARM's variation term: squared forward differences (down, right) of the shifted image at p."""
    qd = tl.minimum(tl.maximum(yd + sy, 0), H - 1) * W + qx
    qr = qy * W + tl.minimum(tl.maximum(xr + sx, 0), W - 1)
    d0, d1, d2 = _load_rgb(img, HW, qd, mask)
    r0, r1, r2 = _load_rgb(img, HW, qr, mask)
    e0, e1, e2 = n0 - d0, n1 - d1, n2 - d2
    f0, f1, f2 = n0 - r0, n1 - r1, n2 - r2
    return (e0 * e0 + e1 * e1 + e2 * e2 + f0 * f0 + f1 * f1 + f2 * f2) / 3.0


@triton.jit
def _refine_weights_kernel(img_ptr, w_ptr, sy_ptr, sx_ptr, prior_ptr, H, W, N_NB, rgb_scale, aux_weight,
                           IS_VARM: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    HW = H * W
    mask = pix < HW
    y = pix // W
    x = pix % W
    img = img_ptr + b * 3 * HW
    wb = w_ptr + b * N_NB * HW
    c0, c1, c2 = _load_rgb(img, HW, pix, mask)
    # pass 1: mean over the neighbours
    m0 = tl.zeros([BLOCK_P], tl.float32)
    m1 = tl.zeros([BLOCK_P], tl.float32)
    m2 = tl.zeros([BLOCK_P], tl.float32)
    for k in range(N_NB):
        qy, qx = _clamped(y, x, tl.load(sy_ptr + k), tl.load(sx_ptr + k), H, W)
        n0, n1, n2 = _load_rgb(img, HW, qy * W + qx, mask)
        m0 += n0
        m1 += n1
        m2 += n2
    m0 = m0 / N_NB
    m1 = m1 / N_NB
    m2 = m2 / N_NB
    # pass 2: unbiased variance
    v0 = tl.zeros([BLOCK_P], tl.float32)
    v1 = tl.zeros([BLOCK_P], tl.float32)
    v2 = tl.zeros([BLOCK_P], tl.float32)
    for k in range(N_NB):
        qy, qx = _clamped(y, x, tl.load(sy_ptr + k), tl.load(sx_ptr + k), H, W)
        n0, n1, n2 = _load_rgb(img, HW, qy * W + qx, mask)
        v0 += (n0 - m0) * (n0 - m0)
        v1 += (n1 - m1) * (n1 - m1)
        v2 += (n2 - m2) * (n2 - m2)
    i0 = rgb_scale / (tl.sqrt(v0 / (N_NB - 1)) + _STD_EPS)
    i1 = rgb_scale / (tl.sqrt(v1 / (N_NB - 1)) + _STD_EPS)
    i2 = rgb_scale / (tl.sqrt(v2 / (N_NB - 1)) + _STD_EPS)
    # pass 3: appearance logits (stored) and online softmax statistics
    max_a = tl.full([BLOCK_P], float("-inf"), tl.float32)
    sum_a = tl.zeros([BLOCK_P], tl.float32)
    max_v = tl.full([BLOCK_P], float("-inf"), tl.float32)
    sum_v = tl.zeros([BLOCK_P], tl.float32)
    yd = tl.minimum(y + 1, H - 1)
    xr = tl.minimum(x + 1, W - 1)
    for k in range(N_NB):
        sy = tl.load(sy_ptr + k)
        sx = tl.load(sx_ptr + k)
        qy, qx = _clamped(y, x, sy, sx, H, W)
        n0, n1, n2 = _load_rgb(img, HW, qy * W + qx, mask)
        t0 = tl.abs(c0 - n0) * i0
        t1 = tl.abs(c1 - n1) * i1
        t2 = tl.abs(c2 - n2) * i2
        a = -(t0 * t0 + t1 * t1 + t2 * t2) / 3.0
        tl.store(wb + k * HW + pix, a, mask=mask)
        new_max = tl.maximum(max_a, a)
        sum_a = sum_a * tl.exp(max_a - new_max) + tl.exp(a - new_max)
        max_a = new_max
        if IS_VARM:
            v = _variation(img, HW, H, W, qy, qx, yd, xr, sy, sx, n0, n1, n2, mask)
            new_max_v = tl.maximum(max_v, v)
            sum_v = sum_v * tl.exp(max_v - new_max_v) + tl.exp(v - new_max_v)
            max_v = new_max_v
    # pass 4: normalise and add the second term
    for k in range(N_NB):
        a = tl.load(wb + k * HW + pix, mask=mask, other=0.0)
        wk = tl.exp(a - max_a) / sum_a
        if IS_VARM:
            sy = tl.load(sy_ptr + k)
            sx = tl.load(sx_ptr + k)
            qy, qx = _clamped(y, x, sy, sx, H, W)
            n0, n1, n2 = _load_rgb(img, HW, qy * W + qx, mask)
            v = _variation(img, HW, H, W, qy, qx, yd, xr, sy, sx, n0, n1, n2, mask)
            wk = wk + aux_weight * tl.exp(v - max_v) / sum_v
        else:
            wk = wk + aux_weight * tl.load(prior_ptr + k).to(tl.float32)
        tl.store(wb + k * HW + pix, wk, mask=mask)


@triton.jit
def _refine_step_kernel(src_ptr, dst_ptr, w_ptr, nc_ptr, sy_ptr, sx_ptr, H, W, K, N_NB,
                        HAS_NC: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # b * K + k
    b = plane // K
    k = plane % K
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    HW = H * W
    mask = pix < HW
    if HAS_NC:
        mask_c = mask & (k < tl.load(nc_ptr + b))
    else:
        mask_c = mask
    y = pix // W
    x = pix % W
    src = src_ptr + plane * HW
    wb = w_ptr + b * N_NB * HW
    acc = tl.zeros([BLOCK_P], ACC_DTYPE)
    for j in range(N_NB):
        sy = tl.load(sy_ptr + j)
        sx = tl.load(sx_ptr + j)
        q = tl.minimum(tl.maximum(y + sy, 0), H - 1) * W + tl.minimum(tl.maximum(x + sx, 0), W - 1)
        wk = tl.load(wb + j * HW + pix, mask=mask_c, other=0.0)
        acc += wk * tl.load(src + q, mask=mask_c, other=0.0)
    tl.store(dst_ptr + plane * HW + pix, acc.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _refine_step_transpose_kernel(src_ptr, dst_ptr, w_ptr, nc_ptr, sy_ptr, sx_ptr, H, W, K, N_NB,
                                  HAS_NC: tl.constexpr, BLOCK_P: tl.constexpr):
    # dst must be zero-filled: every pixel p adds w_o(p) * G(p) to the pixel it reads through o.
    plane = tl.program_id(0).to(tl.int64)
    b = plane // K
    k = plane % K
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    HW = H * W
    mask = pix < HW
    if HAS_NC:
        mask = mask & (k < tl.load(nc_ptr + b))
    y = pix // W
    x = pix % W
    g = tl.load(src_ptr + plane * HW + pix, mask=mask, other=0.0)
    wb = w_ptr + b * N_NB * HW
    for j in range(N_NB):
        sy = tl.load(sy_ptr + j)
        sx = tl.load(sx_ptr + j)
        q = tl.minimum(tl.maximum(y + sy, 0), H - 1) * W + tl.minimum(tl.maximum(x + sx, 0), W - 1)
        wk = tl.load(wb + j * HW + pix, mask=mask, other=0.0)
        tl.atomic_add(dst_ptr + plane * HW + q, (wk * g).to(dst_ptr.dtype.element_ty), mask=mask)


def _block(num_pixels: int, device: torch.device) -> int:
    if device.type == "cpu":  # the interpreter
        return min(INTERPRET_MAX_BLOCK, triton.next_power_of_2(num_pixels))
    return BLOCK


def _shifts(dilations: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from tscd.kernels.reference.refine import neighbour_shifts

    s = torch.tensor(neighbour_shifts(dilations), dtype=torch.int32, device=device)
    return s[:, 0].contiguous(), s[:, 1].contiguous()


def refine_weights_triton(image: torch.Tensor, dilations: list[int], mode: int, rgb_scale: float, aux_weight: float,
                          prior: torch.Tensor | None) -> torch.Tensor:
    """(B, 3, H, W) -> (B, n, H, W) float32 weights."""
    B, _, H, W = image.shape
    n = 8 * len(dilations)
    sy, sx = _shifts(dilations, image.device)
    w = torch.empty(B, n, H, W, device=image.device, dtype=torch.float32)
    prior_arg = prior if prior is not None else sy  # unused when IS_VARM
    block = _block(H * W, image.device)
    grid = (B, triton.cdiv(H * W, block))
    with device_guard(image):
        _refine_weights_kernel[grid](image, w, sy, sx, prior_arg, H, W, n, float(rgb_scale), float(aux_weight),
                                     IS_VARM=(mode == 0), BLOCK_P=block, num_warps=NUM_WARPS)
    return w


def _propagate(maps: torch.Tensor, w: torch.Tensor, num_channels: torch.Tensor | None, dilations: list[int],
               num_iter: int, transpose: bool) -> torch.Tensor:
    B, K, H, W = maps.shape
    n = 8 * len(dilations)
    sy, sx = _shifts(dilations, maps.device)
    block = _block(H * W, maps.device)
    grid = (B * K, triton.cdiv(H * W, block))
    nc = num_channels if num_channels is not None else sy
    out = maps
    with device_guard(maps):
        for _ in range(num_iter):
            if transpose:
                nxt = torch.zeros_like(maps)
                _refine_step_transpose_kernel[grid](out, nxt, w, nc, sy, sx, H, W, K, n,
                                                    HAS_NC=num_channels is not None, BLOCK_P=block,
                                                    num_warps=NUM_WARPS)
            else:
                nxt = torch.empty_like(maps)
                _refine_step_kernel[grid](out, nxt, w, nc, sy, sx, H, W, K, n, HAS_NC=num_channels is not None,
                                          ACC_DTYPE=tl.float64 if maps.dtype == torch.float64 else tl.float32,
                                          BLOCK_P=block, num_warps=NUM_WARPS)
            out = nxt
    if transpose and num_channels is not None:
        keep = torch.arange(K, device=maps.device).view(1, K) < num_channels.view(B, 1)
        out = out * keep.view(B, K, 1, 1).to(out.dtype)
    return out


def refine_fwd_triton(image: torch.Tensor, cam: torch.Tensor, num_channels: torch.Tensor | None, dilations: list[int],
                      num_iter: int, mode: int, rgb_scale: float, aux_weight: float,
                      prior: torch.Tensor | None) -> torch.Tensor:
    """Weights + ``num_iter`` propagation steps; cam (B, K, H, W) at the image size; returns (B, K, H, W)."""
    w = refine_weights_triton(image, dilations, mode, rgb_scale, aux_weight, prior).to(cam.dtype)
    return _propagate(cam, w, num_channels, dilations, num_iter, transpose=False)


def refine_bwd_triton(grad_out: torch.Tensor, image: torch.Tensor, num_channels: torch.Tensor | None,
                      dilations: list[int], num_iter: int, mode: int, rgb_scale: float, aux_weight: float,
                      prior: torch.Tensor | None) -> torch.Tensor:
    """The transpose of ``refine_fwd_triton`` w.r.t. cam, applied to ``grad_out``."""
    w = refine_weights_triton(image, dilations, mode, rgb_scale, aux_weight, prior).to(grad_out.dtype)
    return _propagate(grad_out, w, num_channels, dilations, num_iter, transpose=True)
