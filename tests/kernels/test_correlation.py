"""correlation_loss (SCD, docs/method.md 4.2): the reference pinned by an independent transcription of the official
code and hand-made cases, then every backend against the reference (value and gradients of the maps),
gradcheck, opcheck, torch.compile, memory of the fused path, and error messages."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests._utils import assert_close, run_with_cpu_isa
from tests.conftest import require_backend
from tscd.kernels import correlation_loss
from tscd.kernels._ext import has_cpp
from tscd.kernels.correlation import SUPPORTED_BACKENDS, sample_points, teacher_offset
from tscd.kernels.reference.correlation import (
    correlation_core_reference,
    correlation_loss_reference,
    normalize_features,
    pixel_coords,
    random_coords,
)

OP = "correlation_fwd"

# ----------------------------------------------------------------------------------------------
# An independent transcription of the official loss (STEGO-style helper, written here from docs/method.md 4.2):
# (B, S, S, 2) coordinates, grid_sample with the permuted grid, 5-D correlation tensors.
# ----------------------------------------------------------------------------------------------

def _official_style(t1, t2, s1, s2, coords1, coords2, shift=0.0):
    def sample(x, c):
        return F.grid_sample(x, c.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)

    def corr(a, b):
        return torch.einsum("nchw,ncij->nhwij", a, b)

    def norm(x):
        return F.normalize(x, dim=1, eps=1e-10)

    fd = corr(norm(sample(t1, coords1)), norm(sample(t2, coords2)))
    old_mean = fd.mean()
    fd = fd - fd.mean([3, 4], keepdim=True)
    fd = fd - fd.mean() + old_mean
    cd = corr(norm(sample(s1, coords1)), norm(sample(s2, coords2)))
    return (-cd.clamp(0) * (fd - shift)).mean()


def _maps(B=2, Ct=5, Cs=6, size1=(9, 11), size2=(4, 5), dtype=torch.float64, device="cpu"):
    t1 = torch.randn(B, Ct, *size1, dtype=dtype, device=device)
    t2 = torch.randn(B, Ct, *size2, dtype=dtype, device=device)
    s1 = torch.randn(B, Cs, *size1, dtype=dtype, device=device)
    s2 = torch.randn(B, Cs, *size2, dtype=dtype, device=device)
    return t1, t2, s1, s2


@pytest.mark.parametrize("shift", [0.0, 0.25])
def test_reference_matches_official_style(shift):
    t1, t2, s1, s2 = _maps(B=3, Ct=20, Cs=21, size1=(17, 13), size2=(5, 4))
    S = 6
    c1 = torch.rand(3, S, S, 2, dtype=torch.float64) * 2 - 1
    c2 = torch.rand(3, S, S, 2, dtype=torch.float64) * 2 - 1
    official = _official_style(t1, t2, s1, s2, c1, c2, shift)
    ref = correlation_loss_reference(t1, t2, s1, s2, c1.reshape(3, -1, 2), c2.reshape(3, -1, 2), shift=shift)
    assert_close(ref, official, rtol=1e-12, atol=1e-15, name="reference vs official-style")
    loss = correlation_loss(t1, t2, s1, s2, coords=(c1.reshape(3, -1, 2), c2.reshape(3, -1, 2)), shift=shift,
                            backend="torch")
    assert_close(loss, official, rtol=1e-12, atol=1e-15, name="torch backend vs official-style")


def test_reference_hand_computed():
    # One point per view, 2 channels: t1 = (1, 0), t2 = (1, 1)/sqrt2 -> F = 1/sqrt2; centring on one point is
    # F - F + F = F. s1 = (3, 4)/5, s2 = (0, 1) -> G = 0.8; L = -0.8 / sqrt2.
    t1 = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    t2 = torch.tensor([[[2.0, 2.0]]], dtype=torch.float64)
    s1 = torch.tensor([[[3.0, 4.0]]], dtype=torch.float64)
    s2 = torch.tensor([[[0.0, 7.0]]], dtype=torch.float64)
    n = [F.normalize(x, dim=-1) for x in (t1, t2, s1, s2)]
    loss = correlation_core_reference(*n)
    assert abs(loss.item() + 0.8 / 2 ** 0.5) < 1e-14
    # a negative student correlation is clamped to 0 (and passes no gradient)
    s2n = -n[3]
    assert correlation_core_reference(n[0], n[1], n[2], s2n).item() == 0.0
    assert abs(correlation_core_reference(n[0], n[1], n[2], s2n, clamp_student=False).item() - 0.8 / 2 ** 0.5) < 1e-14


def test_sampling_conventions():
    # random coordinates come from the generator, in [-1, 1]; the same seed gives the same points
    c = random_coords(2, 7, generator=torch.Generator().manual_seed(3))
    assert c.shape == (2, 49, 2) and c.abs().max() <= 1
    assert torch.equal(c, random_coords(2, 7, generator=torch.Generator().manual_seed(3)))
    # pixel coordinates hit the pixels exactly: dense sampling equals flattening (no resampling)
    x = torch.randn(1, 3, 5, 4, dtype=torch.float64)
    pc = pixel_coords(5, 4, dtype=torch.float64)
    got = F.grid_sample(x, pc.view(1, -1, 1, 2), align_corners=True, padding_mode="border").flatten(2)
    assert_close(got, x.flatten(2), rtol=0, atol=1e-12, name="pixel coords")
    t1, t2, s1, s2 = _maps(B=1, size1=(5, 4), size2=(3, 3))
    p = sample_points(t1, t2, s1, F.interpolate(s2, size=(6, 7)), dense=True)
    assert [tuple(v.shape) for v in p] == [(1, 20, 5), (1, 9, 5), (1, 20, 6), (1, 9, 6)]
    assert torch.equal(p[0], t1.flatten(2).transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# Backends against the reference (value and the gradients of the student maps, and of the teacher maps
# with teacher_grad). "tiny" cases also run in the Triton interpreter, which is slow on a CPU.
# ----------------------------------------------------------------------------------------------
# (B, Ct, Cs, size1, size2, sampling kwargs)
CASES = {
    "S1-B1": (1, 3, 4, (5, 6), (3, 3), dict(num_samples=1)),
    "S3-B3-odd": (3, 5, 6, (7, 13), (3, 4), dict(num_samples=3)),
    "S5-Ct20-Cs21": (2, 20, 21, (9, 11), (4, 5), dict(num_samples=5)),
    "coords-N1!=N2": (2, 4, 3, (8, 6), (5, 5), dict(coords="uneven")),
    "dense-student-resized": (2, 4, 5, (6, 7), (3, 2), dict(dense=True, student_size=((4, 5), (2, 2)))),
    "dense-subsample-matched": (2, 3, 4, (7, 6), (3, 3), dict(dense=True, num_samples=3, matched=True)),
    "matched-S4": (1, 4, 4, (8, 8), (3, 3), dict(num_samples=4, matched=True)),
    "S17-B3-Ct20-Cs21": (3, 20, 21, (20, 20), (6, 6), dict(num_samples=17)),
    "dense-40x40": (2, 20, 21, (40, 40), (12, 12), dict(dense=True)),
}
TINY = {"S1-B1", "S3-B3-odd", "coords-N1!=N2", "dense-subsample-matched", "matched-S4"}
OPTIONS = {
    "default": dict(),
    "shift-noclamp": dict(shift=0.3, clamp_student=False),
    "nocenter": dict(center_teacher=False),
    "teacher_grad": dict(teacher_grad=True, shift=-0.2),
}


def _case_inputs(case, device, dtype=torch.float64):
    B, Ct, Cs, size1, size2, kw = CASES[case]
    kw = dict(kw)
    st1, st2 = kw.pop("student_size", (size1, size2))
    t1 = torch.randn(B, Ct, *size1, dtype=dtype, device=device)
    t2 = torch.randn(B, Ct, *size2, dtype=dtype, device=device)
    s1 = torch.randn(B, Cs, *st1, dtype=dtype, device=device)
    s2 = torch.randn(B, Cs, *st2, dtype=dtype, device=device)
    if kw.get("coords") == "uneven":
        kw["coords"] = (torch.rand(B, 10, 2, dtype=dtype, device=device) * 2.4 - 1.2,  # some outside: border
                        torch.rand(B, 7, 2, dtype=dtype, device=device) * 2 - 1)
    return (t1, t2, s1, s2), kw


def _run(maps, kw, backend, dtype, seed=0, **options):
    leaves = [m.detach().to(dtype).requires_grad_() for m in maps]
    loss = correlation_loss(*leaves, generator=torch.Generator().manual_seed(seed), backend=backend, **kw,
                            **options)
    wrt = leaves if options.get("teacher_grad") else leaves[2:]
    grads = torch.autograd.grad(loss, wrt)
    return loss, grads


def _clamp_flip_slack(maps, kw, options, seed=0, tau=1e-5):
    """Per element of each gradient :func:`_run` returns: the sum of |what one pair adds| over the pairs whose student
    correlation G lies within ``tau`` of the clamp's kink at 0 (float64, the same sample points).

    ``max(G, 0)`` passes G's gradient on one side of 0 and none on the other, so a pair whose G is within rounding of
    0 adds its whole term to the gradient in one precision and nothing in another: every float32 implementation (the
    torch reference's too) decides that side by its rounding (about 1e-6 for G). A large case has a few such pairs
    in one seed out of three; elsewhere this slack is 0."""
    if not options.get("clamp_student", True):
        return None
    leaves = [m.detach().double().requires_grad_() for m in maps]
    teacher_grad = options.get("teacher_grad", False)
    teachers = leaves[:2] if teacher_grad else [m.detach() for m in leaves[:2]]
    t1, t2, s1, s2 = (normalize_features(x) for x in sample_points(
        *teachers, *leaves[2:], **kw, generator=torch.Generator().manual_seed(seed)))
    G = s1 @ s2.transpose(1, 2)
    offset = teacher_offset(t1, t2, center_teacher=options.get("center_teacher", True),
                            shift=options.get("shift", 0.0))
    wrt = leaves if teacher_grad else leaves[2:]
    slack = [torch.zeros_like(w) for w in wrt]
    for b, i, j in (G.abs() < tau).nonzero().tolist():
        term = G[b, i, j] * (t1[b, i] @ t2[b, j] + offset[b, i]) / G.numel()
        for acc, grad in zip(slack, torch.autograd.grad(term, wrt, retain_graph=True, allow_unused=True)):
            if grad is not None:
                acc += grad.abs()
    return slack


def _check(case, backend, device, options):
    require_backend(OP, backend, device, SUPPORTED_BACKENDS)
    if backend == "triton" and device == "cpu" and case not in TINY:
        pytest.skip("large case: too slow in the Triton interpreter (runs on GPU)")
    maps, kw = _case_inputs(case, device)
    maps = [m.float().double() for m in maps]  # the values the float32 run receives: no input rounding in the error
    ref, ref_grads = _run(maps, kw, "torch", torch.float64, **options)
    loss, grads = _run(maps, kw, backend, torch.float32, **options)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    scale = max(1.0, ref.abs().item())
    assert_close(loss, ref, rtol=1e-4, atol=2e-6 * scale, name=f"{backend} loss {case}")
    slack = _clamp_flip_slack(maps, kw, options) or [0.0] * len(grads)
    for k, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, rtol=1e-3, atol=1e-5 * max(1e-6, r.abs().max().item()) + 1e-8 + slack[k],
                     name=f"{backend} grad {k} {case}")


@pytest.mark.parametrize("case", list(CASES))
def test_correlation_parity(backend_device, case):
    _check(case, *backend_device, OPTIONS["default"])


@pytest.mark.parametrize("option", [o for o in OPTIONS if o != "default"])
@pytest.mark.parametrize("case", ["S3-B3-odd", "coords-N1!=N2"])
def test_correlation_parity_options(backend_device, case, option):
    _check(case, *backend_device, OPTIONS[option])


def test_correlation_float64_exact(backend_device):
    """In float64 the fused C++ core reproduces the reference to rounding (same points, same value)."""
    backend, device = backend_device
    require_backend(OP, backend, device, SUPPORTED_BACKENDS)
    if backend == "triton":
        pytest.skip("the Triton kernels compute in float32")
    maps, kw = _case_inputs("S5-Ct20-Cs21", device)
    ref, ref_grads = _run(maps, kw, "torch", torch.float64)
    loss, grads = _run(maps, kw, backend, torch.float64)
    assert_close(loss, ref, rtol=1e-12, atol=1e-15, name="float64 loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, rtol=1e-10, atol=1e-16, name="float64 grad")


def test_correlation_all_zero_features(backend_device):
    """Zero maps normalise to zero vectors (eps 1e-10): loss 0, gradients finite, never NaN."""
    backend, device = backend_device
    require_backend(OP, backend, device, SUPPORTED_BACKENDS)
    maps = [torch.zeros(2, c, 5, 5, device=device) for c in (3, 3, 4, 4)]
    maps[1] = torch.randn(2, 3, 5, 5, device=device)  # one zero teacher and zero students
    loss, grads = _run(maps, dict(num_samples=2), backend, torch.float32, teacher_grad=True)
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_correlation_half_inputs(backend_device, dtype):
    """Half inputs run in float32 on the fused backends: the error vs the float64 reference is at most 2x that
    of the torch reference run in the same dtype (plus the output rounding)."""
    backend, device = backend_device
    require_backend(OP, backend, device, SUPPORTED_BACKENDS)
    if backend == "torch":
        pytest.skip("the torch reference in half precision is the yardstick here")
    if device == "cpu" and dtype == torch.float16 and backend == "triton":
        pytest.skip("one half type is enough in the interpreter")
    maps, kw = _case_inputs("S3-B3-odd", device, dtype=torch.float32)
    exact, _ = _run(maps, kw, "torch", torch.float64)
    out, grads = _run(maps, kw, backend, dtype)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    ref_half, _ = _run(maps, kw, "torch", dtype)
    err = abs(out.double().item() - exact.item())
    err_ref = abs(ref_half.double().item() - exact.item())
    assert err <= 2 * err_ref + torch.finfo(dtype).eps * abs(exact.item()), (err, err_ref)


def test_correlation_non_contiguous_inputs(backend_device):
    backend, device = backend_device
    require_backend(OP, backend, device, SUPPORTED_BACKENDS)
    maps = [torch.randn(2, 6, 5, c, device=device).permute(0, 3, 2, 1) for c in (3, 3, 4, 4)]  # (2, C, 5, 6)
    assert not maps[0].is_contiguous()
    ref, ref_grads = _run(maps, dict(num_samples=3), "torch", torch.float64)
    loss, grads = _run(maps, dict(num_samples=3), backend, torch.float32)
    assert_close(loss, ref, rtol=1e-4, atol=1e-6, name="non-contiguous loss")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, rtol=1e-3, atol=1e-6, name="non-contiguous grad")


def test_correlation_generator_reproducible():
    maps, kw = _case_inputs("S3-B3-odd", "cpu", dtype=torch.float32)
    a, _ = _run(maps, kw, "torch", torch.float32, seed=5)
    b, _ = _run(maps, kw, "torch", torch.float32, seed=5)
    c, _ = _run(maps, kw, "torch", torch.float32, seed=6)
    assert a.item() == b.item() and a.item() != c.item()


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, memory
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_correlation_gradcheck(backend, teacher_grad):
    require_backend(OP, backend, "cpu", SUPPORTED_BACKENDS)
    t1, t2, s1, s2 = _maps(B=2, Ct=3, Cs=4, size1=(4, 5), size2=(3, 3))
    c1 = torch.rand(2, 6, 2, dtype=torch.float64) * 2 - 1
    c2 = torch.rand(2, 5, 2, dtype=torch.float64) * 2 - 1
    kw = dict(coords=(c1, c2), backend=backend, shift=0.1, teacher_grad=teacher_grad)
    if teacher_grad:
        inputs = tuple(x.requires_grad_() for x in (t1, t2, s1, s2))
        assert torch.autograd.gradcheck(lambda *m: correlation_loss(*m, **kw), inputs)
    else:
        inputs = (s1.requires_grad_(), s2.requires_grad_())
        assert torch.autograd.gradcheck(lambda a, b: correlation_loss(t1, t2, a, b, **kw), inputs)


def test_correlation_gradcheck_triton():
    require_backend(OP, "triton", "cpu", SUPPORTED_BACKENDS)
    t1, t2, s1, s2 = _maps(B=1, Ct=2, Cs=3, size1=(3, 3), size2=(2, 3))
    kw = dict(coords=torch.rand(1, 4, 2, dtype=torch.float64) * 2 - 1, backend="triton")
    # float32 inside: compare the fused gradient with the float64 reference gradient instead of finite differences
    s1.requires_grad_()
    (g,) = torch.autograd.grad(correlation_loss(t1, t2, s1, s2, **kw), s1)
    (r,) = torch.autograd.grad(correlation_loss(t1, t2, s1, s2, **{**kw, "backend": "torch"}), s1)
    assert_close(g, r, rtol=1e-4, atol=1e-7, name="triton grad")


def _core_args(B=2, N1=7, N2=5, Ct=3, Cs=4):
    t1 = F.normalize(torch.randn(B, N1, Ct), dim=-1)
    t2 = F.normalize(torch.randn(B, N2, Ct), dim=-1)
    s1 = F.normalize(torch.randn(B, N1, Cs), dim=-1).requires_grad_()
    s2 = F.normalize(torch.randn(B, N2, Cs), dim=-1).requires_grad_()
    return t1, t2, s1, s2, torch.randn(B, N1) * 0.1


def _core_torch(t1, t2, s1, s2, offset, clamp):
    """sum_ij P(s1_i . s2_j) (t1_i . t2_j + c_i) per image, materialised (the fused core's definition)."""
    g = s1 @ s2.transpose(1, 2)
    p = g.clamp(min=0) if clamp else g
    return (p * (t1 @ t2.transpose(1, 2) + offset.unsqueeze(-1))).sum(dim=(1, 2))


# (B, N1, N2): N1 around the C++ backward's panel (64 view-1 points) and register block (8), N1 < 8 (padding
# rows only), N2 around its chunk (256 view-2 points) and vector block (16), N2 < 16, N = 1.
CORE_SIZES = [(1, 1, 1), (2, 3, 5), (1, 7, 300), (2, 64, 16), (1, 65, 257), (3, 129, 17), (2, 200, 513)]


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B,N1,N2", CORE_SIZES)
def test_correlation_cpp_core_tiling(B, N1, N2, threads):
    """The raw C++ op, forward and backward (both views' gradients, teacher ones included), against autograd of
    the materialised core on sizes that straddle every tile of the C++ kernel, split over 1-3 parts."""
    dtype = torch.float64
    t1, t2 = (F.normalize(torch.randn(B, n, 20, dtype=dtype), dim=-1) for n in (N1, N2))
    s1, s2 = (F.normalize(torch.randn(B, n, 21, dtype=dtype), dim=-1) for n in (N1, N2))
    offset = torch.randn(B, N1, dtype=dtype) * 0.3
    grad = torch.randn(B, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for clamp in (True, False):
            leaves = [x.clone().requires_grad_() for x in (t1, t2, s1, s2, offset)]
            ref = _core_torch(*leaves, clamp)
            ref_grads = torch.autograd.grad(ref, leaves, grad, retain_graph=True)
            out = torch.ops.tscd.correlation_fwd(t1, t2, s1, s2, offset, clamp)
            assert_close(out, ref, rtol=1e-12, atol=1e-12, name=f"core fwd {B, N1, N2}")
            ds1, ds2, dt1, dt2, dc = torch.ops.tscd.correlation_bwd(grad, t1, t2, s1, s2, offset, clamp, True)
            for name, g, r in zip(("dt1", "dt2", "ds1", "ds2", "dc"), (dt1, dt2, ds1, ds2, dc), ref_grads):
                assert_close(g, r, rtol=1e-10, atol=1e-12, name=f"core {name} {B, N1, N2} clamp={clamp}")
            # without the teacher: same student gradients, teacher ones zero
            ds1_s, ds2_s, dt1_s, dt2_s, dc_s = torch.ops.tscd.correlation_bwd(grad, t1, t2, s1, s2, offset, clamp,
                                                                               False)
            assert torch.equal(ds1_s, ds1) and torch.equal(ds2_s, ds2)
            assert not (dt1_s.any() or dt2_s.any() or dc_s.any())
            # the fused forward+backward: the same value, and the gradients of out itself (grad = 1 per image)
            unit_grads = torch.autograd.grad(ref, leaves, torch.ones_like(grad))
            fused = torch.ops.tscd.correlation_fwd_grad(t1, t2, s1, s2, offset, clamp, True)
            assert_close(fused[0], ref, rtol=1e-12, atol=1e-12, name=f"fused fwd {B, N1, N2}")
            unit_grads = [unit_grads[i] for i in (2, 3, 0, 1, 4)]  # the op's order: ds1, ds2, dt1, dt2, dc
            for name, g, r in zip(("ds1", "ds2", "dt1", "dt2", "dc"), fused[1:], unit_grads):
                assert_close(g, r, rtol=1e-10, atol=1e-12, name=f"fused {name} {B, N1, N2} clamp={clamp}")
            student_only = torch.ops.tscd.correlation_fwd_grad(t1, t2, s1, s2, offset, clamp, False)
            assert torch.equal(student_only[0], fused[0])
            assert torch.equal(student_only[1], fused[1]) and torch.equal(student_only[2], fused[2])
            assert all(x.numel() == 0 for x in student_only[3:])  # teacher gradients not computed
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
@pytest.mark.parametrize("N1", [5, 70])
def test_correlation_cpp_core_nan_stays_local(N1):
    """A NaN view-2 point poisons only what the reference poisons: its own ds2 stays finite (the clamp passes no
    gradient through a NaN G), so the padding rows of a partial register block (N1 % 8 != 0) must not leak it."""
    B, N2 = 1, 40
    t1, t2 = (F.normalize(torch.randn(B, n, 3, dtype=torch.float64), dim=-1) for n in (N1, N2))
    s1, s2 = (F.normalize(torch.randn(B, n, 4, dtype=torch.float64), dim=-1) for n in (N1, N2))
    s2[0, 17] = float("nan")
    offset = torch.randn(B, N1, dtype=torch.float64) * 0.1
    grad = torch.ones(B, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (t1, t2, s1, s2, offset)]
    ref_grads = torch.autograd.grad(_core_torch(*leaves, True), leaves, grad)
    for got in (torch.ops.tscd.correlation_bwd(grad, t1, t2, s1, s2, offset, True, True),
                torch.ops.tscd.correlation_fwd_grad(t1, t2, s1, s2, offset, True, True)[1:]):  # grad = 1: the same
        for name, g, r in zip(("ds1", "ds2", "dt1", "dt2", "dc"), got, [ref_grads[i] for i in (2, 3, 0, 1, 4)]):
            assert torch.equal(torch.isnan(g), torch.isnan(r)), name
            assert_close(torch.nan_to_num(g), torch.nan_to_num(r), rtol=1e-10, atol=1e-12, name=name)
        assert not torch.isnan(got[1]).any()  # ds2, the NaN point's included


ISA_CHILD = r"""
from tests.kernels.test_correlation import CORE_SIZES, _core_torch
for threads in (1, 2):
    torch.set_num_threads(threads)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for B, N1, N2 in CORE_SIZES:
            g = torch.Generator().manual_seed(N1 * 1000 + N2)
            t1, t2 = (torch.nn.functional.normalize(torch.randn(B, n, 20, generator=g), dim=-1) for n in (N1, N2))
            s1, s2 = (torch.nn.functional.normalize(torch.randn(B, n, 21, generator=g), dim=-1) for n in (N1, N2))
            offset = torch.randn(B, N1, generator=g) * 0.3
            t1, t2, s1, s2, offset = (x.to(dtype) for x in (t1, t2, s1, s2, offset))
            grad = torch.randn(B, generator=g).to(dtype)
            for clamp in (True, False):
                leaves = [x.double().requires_grad_() for x in (t1, t2, s1, s2, offset)]
                ref = _core_torch(*leaves, clamp)
                ref_grads = torch.autograd.grad(ref, leaves, grad.double())
                order = [ref_grads[i] for i in (2, 3, 0, 1, 4)]
                out = torch.ops.tscd.correlation_fwd(t1, t2, s1, s2, offset, clamp)
                bwd = torch.ops.tscd.correlation_bwd(grad, t1, t2, s1, s2, offset, clamp, True)
                fused = torch.ops.tscd.correlation_fwd_grad(t1, t2, s1, s2, offset, clamp, True)
                what = (B, N1, N2, dtype, clamp, threads)
                for got, want in [(out, ref), (fused[0], ref)] + list(zip(bwd, (o for o in order))) + \
                        [(f * grad.view(-1, *[1] * (f.dim() - 1)), o) for f, o in zip(fused[1:], order)]:
                    err = (got.double() - want.detach()).abs().max().item()
                    assert err <= tol * (1 + want.abs().max().item()), (what, err)
"""


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_correlation_cpp_every_instruction_set(isa):
    """The CPU kernels are compiled for AVX-512, AVX2 + FMA and the baseline (each with its own register blocks) and
    run the widest the CPU has; TSCD_CPU_ISA caps it, so each path this CPU can run is checked here (forward,
    backward and the fused op against the materialised core, float64 and float32, every tile size, 1 and 2
    threads). In a child process: the level is read once per process."""
    require_backend("correlation_fwd", "cpp", "cpu", SUPPORTED_BACKENDS)
    run_with_cpu_isa(isa, ISA_CHILD)


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
def test_correlation_opcheck_cpp():
    args = _core_args()
    torch.library.opcheck(torch.ops.tscd.correlation_fwd.default, (*args, True))
    torch.library.opcheck(torch.ops.tscd.correlation_fwd.default, (*args, False))
    t1, t2, s1, s2, off = args
    torch.library.opcheck(torch.ops.tscd.correlation_bwd.default,
                          (torch.randn(2), t1, t2, s1.detach(), s2.detach(), off, True, True))


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
@pytest.mark.parametrize("teacher_grad", [True, False])
def test_correlation_opcheck_cpp_fused(teacher_grad):
    t1, t2, s1, s2, off = (x.detach() for x in _core_args())
    if teacher_grad:
        t1, t2, off = (x.requires_grad_() for x in (t1, t2, off))
    s1.requires_grad_()
    torch.library.opcheck(torch.ops.tscd.correlation_fwd_grad.default, (t1, t2, s1, s2, off, True, teacher_grad))


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
def test_correlation_cpp_training_uses_the_fused_op():
    """With autograd on, the cpp loss takes its gradients from the forward's sweep (tscd::correlation_fwd_grad) and
    runs no separate backward kernel; under no_grad it runs the forward kernel only. Same loss either way."""
    from torch.profiler import ProfilerActivity, profile

    maps, kw = _case_inputs("S5-Ct20-Cs21", "cpu", torch.float32)
    t1, t2, s1, s2 = maps
    s1.requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = correlation_loss(t1, t2, s1, s2, generator=torch.Generator().manual_seed(0), backend="cpp", **kw)
        loss.backward()
    names = {e.name for e in prof.events()}
    assert "tscd::correlation_fwd_grad" in names and not names & {"tscd::correlation_fwd", "tscd::correlation_bwd"}
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        value = correlation_loss(t1, t2, s1, s2, generator=torch.Generator().manual_seed(0), backend="cpp", **kw)
    names = {e.name for e in prof.events()}
    assert "tscd::correlation_fwd" in names and "tscd::correlation_fwd_grad" not in names
    assert_close(value, loss.detach(), rtol=1e-6, atol=1e-9, name="no-grad loss vs training loss")


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
def test_correlation_cpp_fused_op_refuses_missing_teacher_grads():
    t1, t2, s1, s2, off = (x.detach() for x in _core_args())
    t1.requires_grad_()
    s1.requires_grad_()
    out = torch.ops.tscd.correlation_fwd_grad(t1, t2, s1, s2, off, True, False)[0]
    with pytest.raises(RuntimeError, match="teacher_grad=False"):
        out.sum().backward()


def test_correlation_opcheck_triton():
    require_backend(OP, "triton", "cpu", SUPPORTED_BACKENDS)
    torch.library.opcheck(torch.ops.tscd.correlation_fwd_triton.default, (*_core_args(B=1, N1=3, N2=2), True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_correlation_torch_compile(backend):
    require_backend(OP, backend, "cpu", SUPPORTED_BACKENDS)
    torch._dynamo.reset()
    t1, t2, s1, s2 = _maps(B=1, Ct=3, Cs=4, size1=(4, 4), size2=(3, 3), dtype=torch.float32)
    coords = (torch.rand(1, 5, 2) * 2 - 1, torch.rand(1, 4, 2) * 2 - 1)
    s1.requires_grad_()

    def f(a, b, c, d):
        return correlation_loss(a, b, c, d, coords=coords, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(t1, t2, s1, s2)
    (g,) = torch.autograd.grad(loss, s1)
    s1_ref = s1.detach().requires_grad_()
    loss_ref = f(t1, t2, s1_ref, s2)
    (g_ref,) = torch.autograd.grad(loss_ref, s1_ref)
    assert_close(loss, loss_ref, rtol=1e-5, atol=1e-7, name="compiled loss")
    assert_close(g, g_ref, rtol=1e-5, atol=1e-8, name="compiled grad")


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
def test_correlation_cpp_memory_does_not_grow_with_pairs():
    """The fused forward+backward allocates O(B*N*C): far below one N1 x N2 float tensor."""
    from torch.profiler import ProfilerActivity, profile

    B, N = 1, 3000  # N1 * N2 * 4 bytes = 36 MB per materialised tensor
    t1, t2, s1, s2 = _maps(B=B, Ct=4, Cs=5, size1=(60, 50), size2=(60, 50), dtype=torch.float32)
    s1.requires_grad_()
    s2.requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        correlation_loss(t1, t2, s1, s2, dense=True, backend="cpp").backward()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    assert peak < 0.1 * N * N * 4, peak


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(teacher1=torch.rand(2, 3, 8)), ValueError, r"`teacher1` must be a 4-D float tensor \(B, Ct, h1, w1\)"),
    (dict(student2=torch.rand(3, 4, 5, 5)), ValueError, r"batch sizes differ: .*`student2` has 3"),
    (dict(teacher2=torch.rand(2, 5, 5, 5)), ValueError, r"`teacher1` and `teacher2` must have the same channels"),
    (dict(student1=torch.rand(2, 6, 8, 8)), ValueError, r"`student1` and `student2` must have the same channels"),
    (dict(student1=torch.randint(0, 3, (2, 4, 8, 8))), TypeError, r"`student1` must be a 4-D float tensor.*int64"),
    (dict(student1=torch.rand(2, 4, 8, 8, device="meta")), ValueError, r"one device.*`student1` on meta"),
    (dict(dense=True, num_samples=4), ValueError, r"16 distinct pixels per image, but view 2 .* has only 9 pixels"),
    (dict(num_samples=0), ValueError, r"`num_samples` must be an int >= 1"),
    (dict(coords=torch.rand(2, 5, 3)), ValueError, r"`coords` must have shape \(B=2, N, 2\)"),
    (dict(coords=torch.rand(2, 5, 2), dense=True), ValueError, r"either `coords`, `num_samples` or `dense`"),
    (dict(coords=(torch.rand(2, 5, 2), torch.rand(2, 4, 2)), matched=True), ValueError, r"N1 == N2"),
    (dict(generator=0), TypeError, r"`generator` must be a torch.Generator"),
    (dict(backend="fast"), ValueError, r"unknown backend 'fast'"),
    (dict(backend="cuda"), RuntimeError, r"backend 'cuda' cannot run: the cuda backend runs on CUDA tensors"),
])
def test_correlation_errors(kwargs, exc, match):
    args = dict(teacher1=torch.rand(2, 3, 8, 8), teacher2=torch.rand(2, 3, 3, 3), student1=torch.rand(2, 4, 8, 8),
                student2=torch.rand(2, 4, 3, 3))
    args.update(kwargs)
    maps = [args.pop(k) for k in ("teacher1", "teacher2", "student1", "student2")]
    with pytest.raises(exc, match=match):
        correlation_loss(*maps, **args)


@pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")
def test_correlation_cpp_kernel_checks():
    """Direct calls of the C++ op get the same kind of messages (TORCH_CHECK), never a crash."""
    t1, t2, s1, s2, off = _core_args()
    with pytest.raises(RuntimeError, match=r"`s2` must be a 3-D tensor"):
        torch.ops.tscd.correlation_fwd(t1, t2, s1, s2[0], off, True)
    with pytest.raises(RuntimeError, match=r"`t2` and `s2` must share N2"):
        torch.ops.tscd.correlation_fwd(t1, t2, s1, s2[:, :3], off, True)
    with pytest.raises(RuntimeError, match=r"must be contiguous"):
        torch.ops.tscd.correlation_fwd(t1, t2, s1.transpose(1, 2).contiguous().transpose(1, 2), s2, off, True)
    with pytest.raises(RuntimeError, match=r"share a dtype"):
        torch.ops.tscd.correlation_fwd(t1, t2, s1, s2.double(), off, True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_correlation_gpu_large(backend):
    require_backend(OP, backend, "cuda", SUPPORTED_BACKENDS)
    maps, _ = _case_inputs("dense-40x40", "cuda", dtype=torch.float32)
    for kw in (dict(num_samples=80), dict(dense=True)):
        ref, ref_grads = _run(maps, kw, "torch", torch.float64)
        loss, grads = _run(maps, kw, backend, torch.float32)
        assert_close(loss, ref, rtol=1e-4, atol=1e-6, name=f"{backend} large loss")
        for g, r in zip(grads, ref_grads):
            assert_close(g, r, rtol=1e-3, atol=1e-5 * r.abs().max().item(), name=f"{backend} large grad")
