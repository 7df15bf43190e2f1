"""Triton kernels of ``correlation_loss`` (the fused SCD core, docs/method.md 4.2); the math mirrors csrc/correlation.h.

One kernel serves the three passes. A program owns BLOCK_O "outer" points of one image and streams the
"inner" points in tiles of BLOCK_I, computing the (BLOCK_O x BLOCK_I) tiles G = s_out . s_in^T and
F = t_out . t_in^T with ``tl.dot`` (fp32 accumulation) and never storing them:
    forward     outer = view 1, inner = view 2: per-point partial sums of P(G) * (F + c)  -> (B, N1)
    row pass    outer = view 1, inner = view 2: ds1 = D @ s2, dt1 = E @ t2, dc = rowsum(E)
    column pass outer = view 2, inner = view 1: ds2 = D^T @ s1, dt2 = E^T @ t1 (c indexed by the inner point)
with D = g_b * P'(G) * (F + c) and E = g_b * P(G). Each program writes only its own rows: no atomics.
Channels are padded to a power of two >= 16 (masked loads give zeros), as ``tl.dot`` needs.

Tile heuristic (no autotune: it fails in the interpreter and makes timings noisy): on a GPU the tiles
depend on the padded channel width (``GPU_CONFIGS``: 64 x 64 points, 8 warps, 3 pipeline stages up to 32
channels, down to 32 x 32 and 2 stages at COCO's 128, so that shared memory fits sm_80 and sm_90 with
margin), fp32 inputs through ``tl.dot`` with ``input_precision="tf32x3"`` (tensor cores at about fp32
accuracy); in the CPU interpreter one program spans up to 128 x 128 points (there the cost is per program
and per loop step) and the dots run in plain fp32 (``"ieee"``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tscd.kernels._triton._launch import device_guard

INTERPRET_MAX_BLOCK = 128
MIN_DOT = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _correlation_pass_kernel(out_s_ptr, out_t_ptr, in_s_ptr, in_t_ptr, off_ptr, grad_ptr,
                             loss_ptr, ds_ptr, dt_ptr, dc_ptr,
                             N_OUT, N_IN, CS, CT,
                             CLAMP: tl.constexpr, OFFSET_INNER: tl.constexpr, BACKWARD: tl.constexpr,
                             WITH_T: tl.constexpr, WITH_C: tl.constexpr,
                             BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, CS_P: tl.constexpr, CT_P: tl.constexpr,
                             PRECISION: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < N_OUT
    cs = tl.arange(0, CS_P)
    ct = tl.arange(0, CT_P)
    mask_cs = cs < CS
    mask_ct = ct < CT
    a_s = tl.load(out_s_ptr + b * N_OUT * CS + offs_o[:, None] * CS + cs[None, :],
                  mask=mask_o[:, None] & mask_cs[None, :], other=0.0).to(tl.float32)
    a_t = tl.load(out_t_ptr + b * N_OUT * CT + offs_o[:, None] * CT + ct[None, :],
                  mask=mask_o[:, None] & mask_ct[None, :], other=0.0).to(tl.float32)
    if OFFSET_INNER:
        off_o = tl.zeros([BLOCK_O], tl.float32)
    else:
        off_o = tl.load(off_ptr + b * N_OUT + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    if BACKWARD:
        g_b = tl.load(grad_ptr + b).to(tl.float32)
    else:
        g_b = 1.0
    acc_loss = tl.zeros([BLOCK_O], tl.float32)
    acc_ds = tl.zeros([BLOCK_O, CS_P], tl.float32)
    acc_dt = tl.zeros([BLOCK_O, CT_P], tl.float32)
    acc_dc = tl.zeros([BLOCK_O], tl.float32)
    for i0 in range(0, N_IN, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < N_IN
        b_s = tl.load(in_s_ptr + b * N_IN * CS + offs_i[:, None] * CS + cs[None, :],
                      mask=mask_i[:, None] & mask_cs[None, :], other=0.0).to(tl.float32)
        b_t = tl.load(in_t_ptr + b * N_IN * CT + offs_i[:, None] * CT + ct[None, :],
                      mask=mask_i[:, None] & mask_ct[None, :], other=0.0).to(tl.float32)
        g = tl.dot(a_s, tl.trans(b_s), input_precision=PRECISION)  # (BLOCK_O, BLOCK_I) student correlation
        f = tl.dot(a_t, tl.trans(b_t), input_precision=PRECISION)  # teacher correlation
        if OFFSET_INNER:
            off_i = tl.load(off_ptr + b * N_IN + offs_i, mask=mask_i, other=0.0).to(tl.float32)
            fc = f + off_i[None, :]
        else:
            fc = f + off_o[:, None]
        if CLAMP:
            p = tl.where(g < 0.0, 0.0, g)  # max(G, 0) that keeps NaN (tl.maximum may drop it)
        else:
            p = g
        valid = mask_o[:, None] & mask_i[None, :]
        if BACKWARD:
            if CLAMP:
                d = tl.where(valid & (g >= 0.0), fc * g_b, 0.0)
            else:
                d = tl.where(valid, fc * g_b, 0.0)
            acc_ds += tl.dot(d, b_s, input_precision=PRECISION)
            if WITH_T or WITH_C:
                e = tl.where(valid, p * g_b, 0.0)
                if WITH_T:
                    acc_dt += tl.dot(e, b_t, input_precision=PRECISION)
                if WITH_C:
                    acc_dc += tl.sum(e, axis=1)
        else:
            acc_loss += tl.sum(tl.where(valid, p * fc, 0.0), axis=1)
    if BACKWARD:
        tl.store(ds_ptr + b * N_OUT * CS + offs_o[:, None] * CS + cs[None, :], acc_ds,
                 mask=mask_o[:, None] & mask_cs[None, :])
        if WITH_T:
            tl.store(dt_ptr + b * N_OUT * CT + offs_o[:, None] * CT + ct[None, :], acc_dt,
                     mask=mask_o[:, None] & mask_ct[None, :])
        if WITH_C:
            tl.store(dc_ptr + b * N_OUT + offs_o, acc_dc, mask=mask_o)
    else:
        tl.store(loss_ptr + b * N_OUT + offs_o, acc_loss, mask=mask_o)


@dataclass(frozen=True)
class TileConfig:
    """One GPU launch configuration of ``_correlation_pass_kernel``."""
    block_o: int
    block_i: int
    num_warps: int
    num_stages: int
    precision: str


#: widest padded channel count -> GPU tiles; checked offline for sm_80 and sm_90 by compile_check.py
#: (tests/kernels/test_triton_compile.py): shared memory at most 114,688 B (69 % of sm_80's 166,912).
GPU_CONFIGS = (
    (32, TileConfig(64, 64, 8, 3, "tf32x3")),   # VOC (21 / 20 channels): 82 KB shared
    (64, TileConfig(64, 32, 8, 2, "tf32x3")),   # 98 KB
    (128, TileConfig(32, 32, 8, 2, "tf32x3")),  # COCO (81 / 80): 115 KB (64 x 64 and 3 stages needed 328 KB)
    (256, TileConfig(16, 16, 4, 1, "tf32x3")),  # 82 KB
)
MAX_CHANNELS = GPU_CONFIGS[-1][0]


def _gpu_config(n_out: int, n_in: int, cs_p: int, ct_p: int, *, backward: bool, with_t: bool) -> TileConfig:
    """Tiles by channel width: the kernel keeps (BLOCK_O x C) operands in registers and stages num_stages
    (BLOCK_I x C) tiles of both views in shared memory, so wide channels need smaller tiles and fewer stages.
    (The point counts and pass do not change the choice today; they are arguments so they may.)"""
    widest = max(cs_p, ct_p)
    for width, cfg in GPU_CONFIGS:
        if widest <= width:
            return cfg
    raise ValueError(f"correlation_loss: the triton backend supports at most {MAX_CHANNELS} channels (got "
                     f"{widest} after padding to a power of two); use backend='cuda' or 'torch'")


def _tiles(n_out: int, n_in: int, cs_p: int, ct_p: int, device: torch.device, *, backward: bool,
           with_t: bool) -> TileConfig:
    """The launch configuration by the heuristic in the module docstring."""
    if device.type == "cpu":  # the interpreter
        cap = lambda n: max(MIN_DOT, min(INTERPRET_MAX_BLOCK, triton.next_power_of_2(n)))  # noqa: E731
        return TileConfig(cap(n_out), cap(n_in), 1, 1, "ieee")
    return _gpu_config(n_out, n_in, cs_p, ct_p, backward=backward, with_t=with_t)


def _padded(c: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(c))


def _launch(out_s, out_t, in_s, in_t, offset, grad, loss, ds, dt, dc, *, clamp: bool, offset_inner: bool,
            backward: bool, with_t: bool, with_c: bool) -> None:
    B, n_out, cs = out_s.shape
    n_in, ct = in_s.shape[1], out_t.shape[2]
    cs_p, ct_p = _padded(cs), _padded(ct)
    cfg = _tiles(n_out, n_in, cs_p, ct_p, out_s.device, backward=backward, with_t=with_t)
    dummy = offset  # pointer arguments a pass does not use
    grid = (triton.cdiv(n_out, cfg.block_o), B)
    with device_guard(out_s):
        _correlation_pass_kernel[grid](
            out_s, out_t, in_s, in_t, offset, grad if grad is not None else dummy,
            loss if loss is not None else dummy, ds if ds is not None else dummy, dt if dt is not None else dummy,
            dc if dc is not None else dummy, n_out, n_in, cs, ct,
            CLAMP=clamp, OFFSET_INNER=offset_inner, BACKWARD=backward, WITH_T=with_t, WITH_C=with_c,
            BLOCK_O=cfg.block_o, BLOCK_I=cfg.block_i, CS_P=cs_p, CT_P=ct_p, PRECISION=cfg.precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def correlation_fwd_triton(t1: torch.Tensor, t2: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor,
                           offset: torch.Tensor, clamp_student: bool) -> torch.Tensor:
    """Per-image sums (B,) of P(s1_i . s2_j) * (t1_i . t2_j + offset_i); inputs float32, contiguous."""
    B, N1 = offset.shape
    partial = torch.empty(B, N1, device=t1.device, dtype=torch.float32)
    _launch(s1, t1, s2, t2, offset, None, partial, None, None, None, clamp=clamp_student, offset_inner=False,
            backward=False, with_t=False, with_c=False)
    return partial.sum(dim=1, dtype=torch.float64).to(t1.dtype)


def correlation_bwd_triton(grad: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, s1: torch.Tensor,
                           s2: torch.Tensor, offset: torch.Tensor, clamp_student: bool,
                           teacher_grad: bool) -> list[torch.Tensor]:
    """[ds1, ds2, dt1, dt2, doffset] for the per-image upstream gradient ``grad`` (B,); teacher ones are 0
    unless ``teacher_grad``."""
    ds1, ds2 = torch.empty_like(s1), torch.empty_like(s2)
    dt1, dt2, dc = torch.zeros_like(t1), torch.zeros_like(t2), torch.zeros_like(offset)
    _launch(s1, t1, s2, t2, offset, grad, None, ds1, dt1, dc, clamp=clamp_student, offset_inner=False,
            backward=True, with_t=teacher_grad, with_c=teacher_grad)
    _launch(s2, t2, s1, t1, offset, grad, None, ds2, dt2, None, clamp=clamp_student, offset_inner=True,
            backward=True, with_t=teacher_grad, with_c=False)
    return [ds1, ds2, dt1, dt2, dc]
