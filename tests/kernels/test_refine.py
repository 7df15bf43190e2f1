"""refine (VARM / PAR, docs/method.md 4.1): the reference pinned by hand-made cases and an independent
transcription of the official conv-based code, then every backend against the reference (forward
and gradient), gradcheck, opcheck, torch.compile, and error messages."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests._utils import assert_close, run_with_cpu_isa
from tests.conftest import require_backend
from tscd.kernels import refine, refine_weights
from tscd.kernels._ext import has_cpp
from tscd.kernels.reference.refine import (
    DEFAULT_DILATIONS,
    position_prior,
    refine_reference,
    refine_weights_reference,
    shift_clamped,
)
from tscd.kernels.refine import SUPPORTED_BACKENDS

# ----------------------------------------------------------------------------------------------
# An independent transcription of the official implementation style: one-hot dilated 3x3 convs on
# a replicate-padded input build the 48 shifted copies (AFA's PAR.get_dilated_neighbors), written
# here from docs/method.md 4.1 to pin the reference's numerics.
# ----------------------------------------------------------------------------------------------

def _onehot_kernel() -> torch.Tensor:
    k = torch.zeros(8, 1, 3, 3, dtype=torch.float64)
    for i, (dy, dx) in enumerate([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]):
        k[i, 0, dy + 1, dx + 1] = 1
    return k


def _conv_neighbours(x: torch.Tensor, dilations) -> torch.Tensor:
    b, c, h, w = x.shape
    kernel = _onehot_kernel().to(x)
    out = []
    for d in dilations:
        xp = F.pad(x, [d] * 4, mode="replicate").reshape(b * c, 1, h + 2 * d, w + 2 * d)
        out.append(F.conv2d(xp, kernel, dilation=d).view(b, c, 8, h, w))
    return torch.cat(out, dim=2)


def _official_style(img, masks, dilations, num_iter, mode):
    masks = F.interpolate(masks, size=img.shape[-2:], mode="bilinear", align_corners=True)
    nb = _conv_neighbours(img, dilations)
    std = torch.std(nb, dim=2, keepdim=True)
    if mode == "par":
        aff = -(torch.abs(nb - img.unsqueeze(2)) / (std + 1e-8) / 0.3) ** 2
        aff = aff.mean(dim=1, keepdim=True)
        pos = torch.tensor([d * (math.sqrt(2) if i in (0, 2, 5, 7) else 1.0) for d in dilations for i in range(8)],
                           dtype=img.dtype).view(1, 1, -1, 1, 1)
        pos_aff = -(pos / (torch.std(pos, dim=2, keepdim=True) + 1e-8) / 0.3) ** 2
        aff = F.softmax(aff, dim=2) + 0.01 * F.softmax(pos_aff, dim=2)
    else:
        aff = -(4 * torch.abs(nb - img.unsqueeze(2)) / (std + 1e-8)) ** 2
        aff = aff.mean(dim=1, keepdim=True)
        # variation of each shifted copy: differences with its next row / column, last one replicated
        dy = F.pad(nb[..., 1:, :] - nb[..., :-1, :], (0, 0, 0, 1))
        dx = F.pad(nb[..., :, 1:] - nb[..., :, :-1], (0, 1, 0, 0))
        var = (dy ** 2 + dx ** 2).mean(dim=1, keepdim=True)
        aff = F.softmax(aff, dim=2) - 0.01 * F.softmax(var, dim=2)
    for _ in range(num_iter):
        masks = (_conv_neighbours(masks, dilations) * aff).sum(2)
    return masks


@pytest.mark.parametrize("mode", ["varm", "par"])
@pytest.mark.parametrize("size", [(9, 13), (30, 27)])
def test_reference_matches_official_style(mode, size):
    img = torch.rand(2, 3, *size, dtype=torch.float64)
    cam = torch.randn(2, 4, size[0] // 2 + 1, size[1] // 2 + 1, dtype=torch.float64)
    ref = refine_reference(img, cam, num_iter=3, mode=mode)
    official = _official_style(img, cam, DEFAULT_DILATIONS, 3, mode)
    assert_close(ref, official, rtol=1e-10, atol=1e-12, name=f"reference vs official-style ({mode})")


@pytest.mark.parametrize("mode,total", [("varm", 0.99), ("par", 1.01)])
def test_reference_weights_sum(mode, total):
    w = refine_weights_reference(torch.rand(2, 3, 11, 17, dtype=torch.float64), mode=mode)
    assert w.shape == (2, 48, 11, 17)
    assert_close(w.sum(1), torch.full((2, 11, 17), total, dtype=torch.float64), rtol=0, atol=1e-12, name="sum")
    if mode == "varm":
        assert (w < 0).any() or (w > 0).all()  # weights may be negative; never NaN
    assert torch.isfinite(w).all()


def test_reference_constant_image_hand_computed():
    # Constant image: sigma = 0, all differences 0 -> appearance and variation softmaxes are uniform:
    # w_o = (1 - 0.01) / 48 for every o; a constant map is scaled by 0.99 per step.
    img = torch.full((1, 3, 5, 6), 0.5, dtype=torch.float64)
    w = refine_weights_reference(img)
    assert_close(w, torch.full_like(w, 0.99 / 48), rtol=0, atol=1e-15, name="uniform weights")
    out = refine_reference(img, torch.full((1, 2, 5, 6), 2.0, dtype=torch.float64), num_iter=10)
    assert_close(out, torch.full_like(out, 2.0 * 0.99 ** 10), rtol=1e-13, atol=0, name="constant map")


def test_shift_clamped_border():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    assert shift_clamped(x, -1, 2)[0, 0].tolist() == [[2, 3, 3, 3], [2, 3, 3, 3], [6, 7, 7, 7]]
    assert shift_clamped(x, 5, -5)[0, 0].tolist() == [[8, 8, 8, 8]] * 3


def test_position_prior_hand_computed():
    pos = torch.tensor([math.sqrt(2), 1, math.sqrt(2), 1, 1, math.sqrt(2), 1, math.sqrt(2)], dtype=torch.float64)
    expected = (-(pos / (pos.std() + 1e-8) / 0.3) ** 2).softmax(0)
    assert_close(position_prior([1], dtype=torch.float64), expected, rtol=1e-14, atol=0, name="prior")
    assert abs(position_prior(DEFAULT_DILATIONS, dtype=torch.float64).sum().item() - 1) < 1e-12


def test_parity_tolerance_detects_mutations():
    """The tolerances used below are far tighter than what a wrong kernel would produce: dropping
    the variation term or changing the border mode moves the output by orders of magnitude more."""
    img = torch.rand(1, 3, 16, 19, dtype=torch.float64)
    cam = torch.randn(1, 3, 16, 19, dtype=torch.float64)
    ref = refine_reference(img, cam, num_iter=10)
    no_variation = refine_reference(img, cam, num_iter=10, aux_weight=0.0) * 0.99 ** 10
    assert (no_variation - ref).abs().max() > 1e-3
    zero_border = _official_style_zero_border(img, cam)
    assert (zero_border - ref).abs().max() > 1e-2


def _official_style_zero_border(img, cam):
    global _conv_neighbours
    saved = _conv_neighbours

    def zero_pad_neighbours(x, dilations):
        b, c, h, w = x.shape
        kernel = _onehot_kernel().to(x)
        return torch.cat([F.conv2d(F.pad(x, [d] * 4).reshape(b * c, 1, h + 2 * d, w + 2 * d), kernel,
                                   dilation=d).view(b, c, 8, h, w) for d in dilations], dim=2)

    _conv_neighbours = zero_pad_neighbours
    try:
        return _official_style(img, cam, DEFAULT_DILATIONS, 10, "varm")
    finally:
        _conv_neighbours = saved


# ----------------------------------------------------------------------------------------------
# Backends against the reference.
# (B, K, H, W, cam size, dilations, num_iter, num_channels); "tiny" cases also run in the Triton
# interpreter, which is slow on a CPU.
# ----------------------------------------------------------------------------------------------
CASES = {
    "1x1": (1, 1, 1, 1, (1, 1), DEFAULT_DILATIONS, 3, None),
    "2x3": (2, 2, 2, 3, (2, 3), DEFAULT_DILATIONS, 2, None),
    "odd7x13-K1-resize": (1, 1, 7, 13, (4, 5), DEFAULT_DILATIONS, 10, None),
    "B3-K3-nonsquare": (3, 3, 12, 5, (6, 3), (1, 2, 3), 4, None),
    "K21-30x26": (2, 21, 30, 26, (8, 7), DEFAULT_DILATIONS, 10, None),
    "border-heavy-40x9": (1, 2, 40, 9, (40, 9), (1, 8, 24, 33), 5, None),
    "ragged-K": (3, 5, 10, 11, (5, 6), (1, 2, 4), 3, [5, 2, 0]),
    # the CPU kernel's padded rows and 16-pixel vectors: 1- and 2-pixel rows/columns, widths that are not a
    # multiple of 16, images smaller than the dilations, K across the 8-channel chunks with num_channels masks
    "W1-tall": (1, 3, 19, 1, (19, 1), DEFAULT_DILATIONS, 3, None),
    "H1-wide": (2, 2, 1, 37, (1, 19), DEFAULT_DILATIONS, 3, None),
    "H2-W17": (2, 2, 2, 17, (2, 17), (1, 3), 4, None),
    "W2-H17": (1, 3, 17, 2, (17, 2), (1, 5, 30), 3, None),
    "small-5x6-all-dil": (2, 2, 5, 6, (3, 3), DEFAULT_DILATIONS, 4, None),
    "odd-W33-K9-masked": (2, 9, 11, 33, (6, 17), DEFAULT_DILATIONS, 4, [9, 5]),
    "K13-W47-ragged": (3, 13, 7, 47, (7, 47), (1, 3, 24), 3, [13, 8, 1]),
    "large-dil-21x45": (1, 2, 21, 45, (21, 45), (2, 40), 3, None),
    "K21-odd-9x19": (1, 21, 9, 19, (5, 7), (1, 2, 4, 8), 3, None),
}
TINY = {"1x1", "2x3", "B3-K3-nonsquare", "ragged-K"}


def _inputs(case, device, dtype=torch.float32):
    B, K, H, W, (h, w), dil, n_iter, nc = CASES[case]
    img = torch.rand(B, 3, H, W, device=device, dtype=dtype)
    cam = torch.randn(B, K, h, w, device=device, dtype=dtype)
    if case == "border-heavy-40x9":  # strong edges next to the border
        img[:, :, :, :2] = 1.0
        img[:, :, -3:, :] = 0.0
    return img, cam, dict(dilations=dil, num_iter=n_iter, num_channels=nc)


def _check_case(case, backend, device, mode):
    require_backend("refine_fwd", backend, device, SUPPORTED_BACKENDS)
    if backend == "triton" and device == "cpu" and case not in TINY:
        pytest.skip("large case: too slow in the Triton interpreter (runs on GPU)")
    img, cam, kw = _inputs(case, device)
    cam_ref = cam.detach().double().requires_grad_()
    ref = refine_reference(img.double(), cam_ref, mode=mode, **kw)
    cam_k = cam.detach().requires_grad_()
    out = refine(img, cam_k, mode=mode, backend=backend, **kw)
    assert out.dtype == cam.dtype and out.shape == ref.shape
    assert_close(out, ref, rtol=1e-4, atol=2e-5, name=f"{backend} forward {case}")
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad.to(out.dtype))
    assert_close(cam_k.grad, cam_ref.grad, rtol=1e-4, atol=2e-5, name=f"{backend} grad {case}")


@pytest.mark.parametrize("case", list(CASES))
def test_refine_parity_varm(backend_device, case):
    _check_case(case, *backend_device, "varm")


@pytest.mark.parametrize("case", ["2x3", "odd7x13-K1-resize", "B3-K3-nonsquare", "ragged-K"])
def test_refine_parity_par(backend_device, case):
    _check_case(case, *backend_device, "par")


@pytest.mark.parametrize("mode", ["varm", "par"])
@pytest.mark.parametrize("case", ["W1-tall", "H1-wide", "odd-W33-K9-masked", "K13-W47-ragged", "large-dil-21x45"])
def test_refine_float64_tight(case, mode):
    """float64 runs the kernel's own math (exact exp): it matches the reference to rounding, so an index
    off by one at a border, a pad, a clamp or a vector tail shows up far above the tolerance."""
    require_backend("refine_fwd", "cpp", "cpu", SUPPORTED_BACKENDS)
    _check_float64_cpp(case, mode)


def _check_float64_cpp(case, mode):
    img, cam, kw = _inputs(case, "cpu", torch.float64)
    cam_ref = cam.detach().requires_grad_()
    cam_k = cam.detach().requires_grad_()
    ref = refine_reference(img, cam_ref, mode=mode, **kw)
    out = refine(img, cam_k, mode=mode, backend="cpp", **kw)
    assert out.dtype == torch.float64
    assert_close(out, ref, rtol=1e-11, atol=1e-12, name=f"float64 forward {case}")
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    assert_close(cam_k.grad, cam_ref.grad, rtol=1e-11, atol=1e-12, name=f"float64 grad {case}")
    w = refine_weights(img, dilations=kw["dilations"], mode=mode, backend="cpp")
    w_ref = refine_weights_reference(img, dilations=kw["dilations"], mode=mode)
    assert_close(w, w_ref, rtol=1e-12, atol=1e-14, name=f"float64 weights {case}")


# The CPU kernel's cases for each instruction set: odd sizes, 1- and 2-channel to 21-channel maps across the
# 8-channel chunks, num_channels masks, large dilations, borders.
ISA_CASES = ["odd7x13-K1-resize", "K21-odd-9x19", "ragged-K", "border-heavy-40x9", "W1-tall", "H1-wide",
             "odd-W33-K9-masked", "K13-W47-ragged", "large-dil-21x45"]
ISA_CHILD = r"""
from tests.kernels.test_refine import ISA_CASES, _check_case, _check_float64_cpp
for mode in ("varm", "par"):
    for case in ISA_CASES:
        torch.manual_seed(0)
        _check_case(case, "cpp", "cpu", mode)
        _check_float64_cpp(case, mode)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_refine_cpp_every_instruction_set(isa):
    """The CPU kernel's loops are compiled for AVX-512, AVX2 + FMA and the baseline, and run the widest the CPU has;
    TSCD_CPU_ISA caps it, so each path this CPU can run is checked here: forward and gradient, varm and par,
    float32 (against the float64 reference) and float64 (tight, weights too). In a child process: the level is read
    once per process."""
    require_backend("refine_fwd", "cpp", "cpu", SUPPORTED_BACKENDS)
    run_with_cpu_isa(isa, ISA_CHILD)


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
@pytest.mark.parametrize("shape,dil", [((1, 1), (1,)), ((3, 40), (1, 2, 4, 8, 12, 24)), ((23, 5), (7, 30)),
                                       ((16, 16), (1, 15, 16)), ((9, 18), (3,))])
def test_refine_cpp_transpose_is_adjoint(shape, dil):
    """refine_bwd (the transposed step, a gather with border sums on the CPU) is the adjoint of refine_fwd:
    <A x, y> = <x, A^T y> for one step, in float64."""
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, *shape, generator=g, dtype=torch.float64)
    x = torch.randn(2, 10, *shape, generator=g, dtype=torch.float64)
    y = torch.randn(2, 10, *shape, generator=g, dtype=torch.float64)
    nc = torch.tensor([10, 9])
    args = (nc, list(dil), 1, 0, 4.0, -0.01, None)
    ax = torch.ops.tscd.refine_fwd(img, x, *args)
    aty = torch.ops.tscd.refine_bwd(y, img, *args)
    assert bool((ax[1, 9] == 0).all()) and bool((aty[1, 9] == 0).all())
    lhs, rhs = (ax * y).sum().item(), (x * aty).sum().item()
    assert abs(lhs - rhs) <= 1e-11 * max(1.0, abs(lhs)), (lhs, rhs)


@pytest.mark.parametrize("mode", ["varm", "par"])
def test_refine_weights_parity(backend_device, mode):
    backend, device = backend_device
    require_backend("refine_weights", backend, device, SUPPORTED_BACKENDS)
    for size in [(9, 14), (5, 37)]:  # 37: two 16-pixel vectors and a tail
        img = torch.rand(2, 3, *size, device=device)
        img[0, :, :, :3] = 0.25  # a flat region: zero variance in some neighbourhoods
        ref = refine_weights_reference(img.double(), mode=mode)
        out = refine_weights(img, mode=mode, backend=backend)
        assert out.shape == ref.shape
        assert_close(out, ref, rtol=1e-4, atol=1e-6, name=f"{backend} weights {size}")


def test_refine_non_contiguous_inputs(backend_device):
    backend, device = backend_device
    require_backend("refine_fwd", backend, device, SUPPORTED_BACKENDS)
    img = torch.rand(2, 11, 9, 3, device=device).permute(0, 3, 2, 1)  # (2, 3, 9, 11), non-contiguous
    cam = torch.randn(2, 9, 11, 3, device=device).permute(0, 3, 1, 2)
    assert not img.is_contiguous() and not cam.is_contiguous()
    out = refine(img, cam, dilations=(1, 2), num_iter=2, backend=backend)
    ref = refine_reference(img.contiguous().double(), cam.contiguous().double(), dilations=(1, 2), num_iter=2)
    assert_close(out, ref, rtol=1e-4, atol=2e-5, name="non-contiguous")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_refine_half_inputs(backend_device, dtype):
    """Half inputs run with float32 math: the error vs the float64 reference is at most 2x that of the
    torch reference run in the same dtype (plus the output rounding)."""
    backend, device = backend_device
    require_backend("refine_fwd", backend, device, SUPPORTED_BACKENDS)
    if backend == "torch":
        pytest.skip("the torch reference in half precision is the yardstick here")
    img = torch.rand(2, 3, 10, 12, device=device)
    cam = torch.rand(2, 3, 10, 12, device=device)
    exact = refine_reference(img.double(), cam.double(), dilations=(1, 2, 4), num_iter=4)
    out = refine(img.to(dtype), cam.to(dtype), dilations=(1, 2, 4), num_iter=4, backend=backend)
    assert out.dtype == dtype
    ref_half = refine_reference(img.to(dtype), cam.to(dtype), dilations=(1, 2, 4), num_iter=4)
    err = (out.double() - exact).abs().max().item()
    err_ref = (ref_half.double() - exact).abs().max().item()
    rounding = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err <= 2 * err_ref + rounding, (err, err_ref)


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_refine_gradcheck(backend):
    require_backend("refine_fwd", backend, "cpu", SUPPORTED_BACKENDS)
    if backend == "triton":  # the interpreter runs each kernel launch slowly: a minimal case, fast mode
        img = torch.rand(2, 3, 3, 4, dtype=torch.float64)
        cam = torch.randn(2, 2, 2, 3, dtype=torch.float64, requires_grad=True)
        kw = dict(dilations=(1, 2), num_iter=2, backend=backend, num_channels=[2, 1])
        assert torch.autograd.gradcheck(lambda c: refine(img, c, **kw), (cam,), fast_mode=True)
        return
    img = torch.rand(2, 3, 5, 6, dtype=torch.float64)
    cam = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    kw = dict(dilations=(1, 2, 5), num_iter=3, backend=backend, num_channels=[2, 1])
    assert torch.autograd.gradcheck(lambda c: refine(img, c, **kw), (cam,))
    if backend == "torch":  # the reference also differentiates through the image
        img.requires_grad_()
        assert torch.autograd.gradcheck(lambda i: refine(i, cam.detach(), **kw), (img,))


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
def test_refine_opcheck_cpp():
    img = torch.rand(2, 3, 6, 7)
    cam = torch.randn(2, 3, 6, 7, requires_grad=True)
    prior = position_prior((1, 2), dtype=torch.float32)
    torch.library.opcheck(torch.ops.tscd.refine_fwd.default, (img, cam, None, [1, 2], 2, 0, 4.0, -0.01, None))
    torch.library.opcheck(torch.ops.tscd.refine_fwd.default,
                          (img, cam, torch.tensor([3, 1]), [1, 2], 2, 1, 1 / 0.3, 0.01, prior))
    torch.library.opcheck(torch.ops.tscd.refine_weights.default, (img, [1, 3], 0, 4.0, -0.01, None))
    torch.library.opcheck(torch.ops.tscd.refine_bwd.default,
                          (torch.randn(2, 3, 6, 7), img, None, [1, 2], 2, 0, 4.0, -0.01, None))


def test_refine_opcheck_triton():
    require_backend("refine_fwd", "triton", "cpu", SUPPORTED_BACKENDS)
    img = torch.rand(1, 3, 4, 5)
    cam = torch.randn(1, 2, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.tscd.refine_fwd_triton.default, (img, cam, None, [1], 1, 0, 4.0, -0.01, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_refine_torch_compile(backend):
    require_backend("refine_fwd", backend, "cpu", SUPPORTED_BACKENDS)
    torch._dynamo.reset()
    img = torch.rand(1, 3, 6, 7)
    cam = torch.randn(1, 2, 3, 4, requires_grad=True)

    def f(i, c):
        return refine(i, c, dilations=(1, 2), num_iter=2, backend=backend).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(img, cam)
    (g,) = torch.autograd.grad(loss, cam)
    cam_ref = cam.detach().requires_grad_()
    loss_ref = f(img, cam_ref)
    (g_ref,) = torch.autograd.grad(loss_ref, cam_ref)
    assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6, name="compiled loss")
    assert_close(g, g_ref, rtol=1e-5, atol=1e-6, name="compiled grad")


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(image=torch.rand(3, 8, 8)), ValueError, r"`image` must be a 4-D float tensor \(B, 3, H, W\); got shape"),
    (dict(image=torch.rand(2, 4, 8, 8)), ValueError, r"`image` must have 3 channels"),
    (dict(cam=torch.rand(2, 5, 8)), ValueError, r"`cam` must be a 4-D float tensor \(B, K, h, w\)"),
    (dict(cam=torch.rand(3, 5, 8, 8)), ValueError, r"batch sizes differ: `image` has 2, `cam` has 3"),
    (dict(image=torch.randint(0, 255, (2, 3, 8, 8))), TypeError,
     r"`image` must be a 4-D float tensor.*got dtype int64"),
    (dict(cam=torch.rand(2, 5, 8, 8, device="meta")), ValueError, r"one device.*`image` on cpu, `cam` on meta"),
    (dict(dilations=()), ValueError, r"`dilations` must be a non-empty sequence of positive ints"),
    (dict(dilations=(1, -2)), ValueError, r"`dilations`"),
    (dict(mode="crf"), ValueError, r"`mode` must be 'varm' or 'par'"),
    (dict(num_iter=-1), ValueError, r"`num_iter` must be an int >= 0"),
    (dict(num_channels=[1, 9]), ValueError, r"`num_channels` must lie in \[0, K=5\]"),
    (dict(num_channels=[1]), ValueError, r"`num_channels` must hold one int per image"),
    (dict(backend="fast"), ValueError, r"unknown backend 'fast'"),
    (dict(backend="cuda"), RuntimeError, r"backend 'cuda' cannot run: the cuda backend runs on CUDA tensors"),
])
def test_refine_errors(kwargs, exc, match):
    args = dict(image=torch.rand(2, 3, 8, 8), cam=torch.rand(2, 5, 8, 8))
    args.update(kwargs)
    image, cam = args.pop("image"), args.pop("cam")
    with pytest.raises(exc, match=match):
        refine(image, cam, **args)


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
def test_refine_image_grad_needs_torch_backend():
    img = torch.rand(1, 3, 6, 6, requires_grad=True)
    with pytest.raises(ValueError, match=r"gradients w.r.t. `image` are implemented by backend='torch' only"):
        refine(img, torch.rand(1, 2, 6, 6), backend="cpp")
    refine(img, torch.rand(1, 2, 6, 6), backend="torch", num_iter=1).sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
def test_refine_cpp_kernel_checks():
    """Direct calls of the C++ op get the same kind of messages (TORCH_CHECK), never a crash."""
    img = torch.rand(1, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"`maps` must be a 4-D tensor|the maps must be \(B, K, H, W\)"):
        torch.ops.tscd.refine_fwd(img, torch.rand(1, 2, 4, 5), None, [1], 1, 0, 4.0, -0.01, None)
    with pytest.raises(RuntimeError, match=r"must be contiguous"):
        torch.ops.tscd.refine_fwd(img, torch.rand(1, 5, 5, 2).permute(0, 3, 1, 2), None, [1], 1, 0, 4.0, -0.01, None)
    with pytest.raises(RuntimeError, match=r"mode par needs the position prior"):
        torch.ops.tscd.refine_fwd(img, torch.rand(1, 2, 5, 5), None, [1], 1, 1, 4.0, 0.01, None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["varm", "par"])
def test_refine_gpu_matches_cpp_large(backend, mode):
    require_backend("refine_fwd", backend, "cuda", SUPPORTED_BACKENDS)
    img = torch.rand(4, 3, 161, 157, device="cuda")
    cam = torch.randn(4, 23, 41, 40, device="cuda", requires_grad=True)
    out = refine(img, cam, mode=mode, backend=backend)
    ref = refine_reference(img.double(), cam.double(), mode=mode)
    assert_close(out, ref, rtol=1e-4, atol=5e-5, name=f"{backend} large")
    g = torch.randn_like(out)
    (gk,) = torch.autograd.grad(out, cam, g)
    cam_d = cam.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(refine_reference(img.double(), cam_d, mode=mode), cam_d, g.double())
    assert_close(gk, gr, rtol=1e-4, atol=5e-5, name=f"{backend} large grad")


