"""The CUDA kernels of csrc/cuda/ executed on the CPU by cudasim (tests/cudasim/README.md), against the CPU ops and
the pure-PyTorch references: every op of every .cu file, forward and backward, float32 and float64, odd sizes, the
VOC (21 / 20) and COCO (81 / 80) channel widths, ragged ``num_channels``, both refine modes, the correlation kernel's
shared-memory opt-in and its refusal, several permutohedral chunks, grids at the y limit, and the same results in
reversed and shuffled block/thread orders. New outputs are poisoned (NaN) so that an element no thread writes shows.

What this proves and what it cannot: see tests/cudasim/README.md (indexing, launch geometry, barriers, atomics,
chunk loops and launch limits: yes; nvcc's code generation, FMA contraction, the GPU's memory model, speed: no)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.utils.deterministic

from tests._utils import assert_close, lattice_error_scale
from tscd.kernels import _ext
from tscd.kernels.correlation import _normalize_fast, teacher_offset
from tscd.kernels.reference.correlation import correlation_core_reference
from tscd.kernels.reference.permutohedral import crf_features, mean_field, permutohedral_filter_reference
from tscd.kernels.reference.refine import DEFAULT_DILATIONS, position_prior, refine_reference, refine_weights_reference

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not _ext.has_cpp(), reason="tscd._C (the CPU ops compared against) is not built")

#: The ops of csrc/cuda/*.cu tested here; test_every_cuda_op_is_covered fails when a .cu file registers another.
COVERED = {"refine_weights", "refine_fwd", "refine_bwd", "correlation_fwd", "correlation_bwd", "permutohedral_fwd",
           "permutohedral_bwd", "dense_crf_fwd"}
#: (rtol, atol) of CUDA-on-CPU vs the CPU op, and vs the reference
TOL_OP = {torch.float64: (1e-11, 1e-12), torch.float32: (2e-5, 1e-5)}
TOL_REF = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 5e-5)}


@pytest.fixture(autouse=True)
def poison_new_outputs():
    """Every tensor the kernels' launchers allocate with at::empty starts as NaN (ints: their maximum)."""
    det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def close(actual, expected, tol, name, extra_atol=0.0):
    """assert_close with the absolute tolerance scaled by the expected values' magnitude (sums of many terms), plus
    ``extra_atol`` (a tensor: per element)."""
    rtol, atol = tol[expected.dtype] if expected.dtype in tol else tol[torch.float64]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    assert_close(actual, expected, rtol=rtol, atol=atol * scale + extra_atol, name=name)


def launches(sim) -> list[dict]:
    return json.loads(sim.launch_log())


def test_poisoning_is_on():
    assert torch.isnan(torch.empty(16)).all()


def test_every_cuda_op_is_covered():
    registered = set()
    for cu in (ROOT / "csrc" / "cuda").glob("*.cu"):
        registered |= set(re.findall(r'\bm\.impl\(\s*"(\w+)"', cu.read_text()))
    assert registered == COVERED, f"ops of csrc/cuda/ without a cudasim test: {registered - COVERED}"


# ---------------------------------------------------------------------------------------------- refine
MODES = {"varm": (0, 4.0, -0.01), "par": (1, 1.0 / 0.3, 0.01)}
#: B, K, H, W, num_channels, num_iter, dilations
REFINE_CASES = {
    "voc": (2, 21, 13, 17, None, 10, DEFAULT_DILATIONS),
    "voc-thresholds-ragged": (2, 42, 9, 11, [42, 17], 3, DEFAULT_DILATIONS),
    "coco-ragged": (3, 81, 11, 6, [81, 40, 0], 2, DEFAULT_DILATIONS),
    "odd": (1, 20, 7, 9, None, 3, (1, 2, 3)),
    "one-pixel": (1, 1, 1, 1, None, 2, DEFAULT_DILATIONS),
    "thin": (2, 5, 2, 31, [5, 2], 4, (1, 5)),
    "blocks": (1, 6, 23, 29, None, 1, DEFAULT_DILATIONS),  # 667 pixels: three 256-thread blocks per plane
}


def _refine_args(mode: str, dil, dtype):
    mode_id, scale, aux = MODES[mode]
    prior = position_prior(dil, 0.3, dtype=dtype) if mode == "par" else None
    return list(dil), mode_id, scale, aux, prior


def _refine_inputs(case, dtype):
    B, K, H, W, nc, num_iter, dil = REFINE_CASES[case]
    img = torch.rand(B, 3, H, W, dtype=dtype)
    cam = torch.randn(B, K, H, W, dtype=dtype)
    nct = None if nc is None else torch.tensor(nc, dtype=torch.int64)
    return img, cam, nct, num_iter, dil


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case", list(REFINE_CASES))
def test_refine(sim, case, mode, dtype):
    img, cam, nc, num_iter, dil = _refine_inputs(case, dtype)
    args = _refine_args(mode, dil, dtype)
    dil_list, mode_id, scale, aux, prior = args
    # weights
    w = sim.refine_weights(img, dil_list, mode_id, scale, aux, prior)
    close(w, torch.ops.tscd.refine_weights(img, dil_list, mode_id, scale, aux, prior), TOL_OP, "weights vs cpp")
    close(w, refine_weights_reference(img, dilations=dil, mode=mode), TOL_REF, "weights vs reference")
    # forward
    sim.clear_launch_log()
    out = sim.refine_fwd(img, cam, nc, dil_list, num_iter, mode_id, scale, aux, prior)
    log = launches(sim)
    close(out, torch.ops.tscd.refine_fwd(img, cam, nc, *args[:1], num_iter, *args[1:]), TOL_OP, "fwd vs cpp")
    cam_ref = cam.clone().requires_grad_()
    ref = refine_reference(img, cam_ref, dilations=dil, num_iter=num_iter, mode=mode,
                           num_channels=None if nc is None else nc.tolist())
    close(out, ref, TOL_REF, "fwd vs reference")
    # geometry: one weights launch over all pixels, then one launch per step over (pixel blocks, image x 4 channels)
    B, K, H, W = cam.shape
    step = "refine_step_kernel<scalar_t, kTranspose>"
    assert [e["name"] for e in log] == ["refine_weights_kernel<scalar_t>"] + [step] * num_iter
    assert log[0]["grid"] == [-(-B * H * W // 256), 1, 1] and log[0]["block"] == [256, 1, 1]
    assert log[1]["grid"] == [-(-H * W // 256), B * -(-K // 4), 1]
    # backward: the transposed steps (atomics)
    g = torch.randn_like(cam)
    grad = sim.refine_bwd(g, img, nc, dil_list, num_iter, mode_id, scale, aux, prior)
    close(grad, torch.ops.tscd.refine_bwd(g, img, nc, dil_list, num_iter, mode_id, scale, aux, prior), TOL_OP,
          "bwd vs cpp")
    ref.backward(g)
    close(grad, cam_ref.grad, TOL_REF, "bwd vs reference")


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
def test_refine_any_order(sim, sim_order, order):
    img, cam, nc, num_iter, dil = _refine_inputs("voc-thresholds-ragged", torch.float64)
    args = _refine_args("varm", dil, torch.float64)
    g = torch.randn_like(cam)
    fwd, bwd = sim.refine_fwd(img, cam, nc, args[0], num_iter, *args[1:]), sim.refine_bwd(g, img, nc, args[0],
                                                                                          num_iter, *args[1:])
    sim_order(order, 7)
    assert torch.equal(sim.refine_fwd(img, cam, nc, args[0], num_iter, *args[1:]), fwd)  # each output: one thread
    assert_close(sim.refine_bwd(g, img, nc, args[0], num_iter, *args[1:]), bwd, rtol=1e-13, atol=1e-14,
                 name=f"bwd {order}")  # atomics: another summation order


def test_refine_nonfinite_like_the_cpu(sim):
    img, cam, nc, num_iter, dil = _refine_inputs("voc", torch.float32)
    img[0, 1, 3, 4] = float("nan")
    cam[1, 2, 5, 5] = float("inf")
    args = _refine_args("varm", dil, torch.float32)
    out = sim.refine_fwd(img, cam, nc, args[0], num_iter, *args[1:])
    cpu = torch.ops.tscd.refine_fwd(img, cam, nc, args[0], num_iter, *args[1:])
    assert torch.equal(out.isnan(), cpu.isnan()) and torch.equal(out.isinf(), cpu.isinf())
    g = torch.randn_like(cam)
    g[1, 0, 0, 0] = float("nan")
    out = sim.refine_bwd(g, img, nc, args[0], num_iter, *args[1:])
    cpu = torch.ops.tscd.refine_bwd(g, img, nc, args[0], num_iter, *args[1:])
    assert torch.equal(out.isnan(), cpu.isnan())


@pytest.mark.slow
def test_refine_grid_y_limit(sim):
    """B * ceil(K / 4) blocks of the step kernel go to grid.y: 65535 is the most a launch takes."""
    img, cam = torch.rand(65535, 3, 1, 1), torch.rand(65535, 4, 1, 1)
    args = _refine_args("varm", (1,), torch.float32)
    sim.clear_launch_log()
    out = sim.refine_fwd(img, cam, None, args[0], 1, *args[1:])
    assert launches(sim)[-1]["grid"] == [1, 65535, 1]
    assert_close(out, torch.ops.tscd.refine_fwd(img, cam, None, args[0], 1, *args[1:]), rtol=1e-5, atol=1e-6,
                 name="y limit")
    with pytest.raises(RuntimeError, match=r"too many \(image, channel\) blocks for one launch: B \* ceil\(K/4\) = "
                                           r"65536 \(max 65535\)"):
        sim.refine_fwd(torch.rand(16384, 3, 1, 1), torch.rand(16384, 16, 1, 1), None, args[0], 1, *args[1:])


# ---------------------------------------------------------------------------------------------- correlation
#: B, N1, N2, Cs, Ct
CORR_CASES = {
    "voc": (2, 37, 29, 21, 20),
    "coco": (2, 65, 33, 81, 80),  # float32: 61952 bytes of shared memory, the opt-in path
    "tile-multiples": (1, 128, 64, 21, 20),
    "single": (1, 1, 1, 1, 1),
    "ragged": (3, 130, 7, 3, 5),
}


def corr_reference(t1, t2, s1, s2, offset, clamp):
    """The fused core by its definition: out_b = sum_ij P(s1_i . s2_j) (t1_i . t2_j + offset_i)."""
    g = torch.einsum("bic,bjc->bij", s1, s2)
    f = torch.einsum("bic,bjc->bij", t1, t2) + offset.unsqueeze(-1)
    return ((g.clamp(min=0) if clamp else g) * f).sum((1, 2))


def _corr_inputs(case, dtype):
    B, N1, N2, Cs, Ct = CORR_CASES[case]
    t1, t2 = torch.randn(B, N1, Ct, dtype=dtype), torch.randn(B, N2, Ct, dtype=dtype)
    s1, s2 = torch.randn(B, N1, Cs, dtype=dtype), torch.randn(B, N2, Cs, dtype=dtype)
    t1, t2, s1, s2 = (_normalize_fast(x) for x in (t1, t2, s1, s2))
    return t1, t2, s1, s2, teacher_offset(t1, t2, center_teacher=True, shift=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("clamp,teacher_grad", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("case", list(CORR_CASES))
def test_correlation(sim, case, clamp, teacher_grad, dtype):
    t1, t2, s1, s2, off = _corr_inputs(case, dtype)
    sim.clear_launch_log()
    out = sim.correlation_fwd(t1, t2, s1, s2, off, clamp)
    close(out, torch.ops.tscd.correlation_fwd(t1, t2, s1, s2, off, clamp), TOL_OP, "fwd vs cpp")
    leaves = [x.clone().requires_grad_() for x in (t1, t2, s1, s2, off)]
    ref = corr_reference(*leaves, clamp)
    close(out, ref, TOL_REF, "fwd vs reference")
    B, N1, N2, Cs, Ct = CORR_CASES[case]
    (fwd,) = launches(sim)
    assert fwd["grid"] == [-(-N1 // 64), B, 1] and fwd["block"] == [64, 1, 1]
    size = t1.element_size()
    assert fwd["smem"] == size * (64 * ((Cs + Ct) | 1) + 32 * (Cs + Ct) + 32)
    g = torch.randn(B, dtype=dtype)
    grads = sim.correlation_bwd(g, t1, t2, s1, s2, off, clamp, teacher_grad)
    cpu = torch.ops.tscd.correlation_bwd(g, t1, t2, s1, s2, off, clamp, teacher_grad)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    names = ["ds1", "ds2", "dt1", "dt2", "doffset"]
    order = [2, 3, 0, 1, 4]  # the op returns [ds1, ds2, dt1, dt2, doffset]
    for i, (a, c) in enumerate(zip(grads, cpu)):
        if i >= 2 and not teacher_grad:
            assert (a == 0).all(), f"{names[i]} must be zeros without teacher_grad"
            continue
        close(a, c, TOL_OP, f"{names[i]} vs cpp")
        close(a, ref_grads[order[i]], TOL_REF, f"{names[i]} vs reference")


def test_correlation_loss_equals_the_reference(sim):
    """The whole SCD loss from the CUDA core (the wrapper's folding of the centring into the offset) equals the
    reference's, value and student gradients."""
    t1, t2, s1, s2, off = _corr_inputs("voc", torch.float64)
    B, N1, N2 = t1.shape[0], t1.shape[1], t2.shape[1]
    loss = -sim.correlation_fwd(t1, t2, s1, s2, off, True).sum() / (B * N1 * N2)
    s1r, s2r = s1.clone().requires_grad_(), s2.clone().requires_grad_()
    ref = correlation_core_reference(t1, t2, s1r, s2r)
    assert_close(loss, ref, rtol=1e-12, atol=1e-14, name="loss")
    grads = sim.correlation_bwd(torch.full((B,), -1.0 / (B * N1 * N2), dtype=torch.float64), t1, t2, s1, s2, off,
                                True, False)
    ref_grads = torch.autograd.grad(ref, [s1r, s2r])
    assert_close(grads[0], ref_grads[0], rtol=1e-10, atol=1e-14, name="ds1")
    assert_close(grads[1], ref_grads[1], rtol=1e-10, atol=1e-14, name="ds2")


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
def test_correlation_any_order(sim, sim_order, order):
    args = _corr_inputs("ragged", torch.float64)
    g = torch.randn(3, dtype=torch.float64)
    fwd, bwd = sim.correlation_fwd(*args, True), sim.correlation_bwd(g, *args, True, True)
    sim_order(order, 3)
    assert torch.equal(sim.correlation_fwd(*args, True), fwd)  # per-block partial sums, summed on the host
    for a, b in zip(sim.correlation_bwd(g, *args, True, True), bwd):
        assert torch.equal(a, b)  # each thread owns its gradient rows


def test_correlation_shared_memory_opt_in_and_refusal(sim):
    """Above 48 KB of shared memory the kernel opts in to the GPU's larger limit; above that limit it refuses with
    the advice to use the Triton backend. The limit is the GPU's: an A100 (166912 bytes) refuses what an H100
    (232448) takes."""
    def inputs(C, dtype):
        t = [torch.rand(1, 70, C, dtype=dtype) for _ in range(4)]
        return (*t, torch.zeros(1, 70, dtype=dtype))

    x = inputs(125, torch.float64)  # Cs + Ct = 250: 192768 bytes
    assert_close(sim.correlation_fwd(*x, True), torch.ops.tscd.correlation_fwd(*x, True), rtol=1e-12, atol=1e-9,
                 name="opt-in")
    assert launches(sim)[-1]["smem"] == 192768
    old = sim.set_shared_memory_optin(166912)
    try:
        with pytest.raises(RuntimeError, match=r"correlation: Ct \+ Cs = 250 channels need 192768 bytes of shared "
                                               r"memory per block, more than this GPU's 166912; use backend='triton'"):
            sim.correlation_fwd(*x, True)
    finally:
        sim.set_shared_memory_optin(old)
    with pytest.raises(RuntimeError, match=r"need 307968 bytes .* more than this GPU's 232448"):
        sim.correlation_fwd(*inputs(200, torch.float64), True)


@pytest.mark.slow
def test_correlation_grid_y_limit(sim):
    args = [torch.rand(65535, 1, 1) for _ in range(4)] + [torch.rand(65535, 1)]
    out = sim.correlation_fwd(*args, True)
    assert launches(sim)[-1]["grid"] == [1, 65535, 1]
    assert_close(out, torch.ops.tscd.correlation_fwd(*args, True), rtol=1e-6, atol=1e-7, name="y limit")
    with pytest.raises(RuntimeError, match="at most 65535 images per call; got 65536"):
        sim.correlation_fwd(*([torch.rand(65536, 1, 1) for _ in range(4)] + [torch.rand(65536, 1)]), True)


# ---------------------------------------------------------------------------------------------- permutohedral
def _features(kind: str, B: int, dtype, H: int = 9, W: int = 11) -> torch.Tensor:
    img = torch.rand(B, 3, H, W, dtype=torch.float64) * 255
    if kind == "bilateral":
        return crf_features(img, 50.0 / 4, 15.0).to(dtype)  # the CRF loss's kernel (d = 5) at 1/2 scale, small image
    if kind == "gaussian":
        return crf_features(img, 3.0).to(dtype)  # d = 2
    return (torch.randn(B, 3, 40, dtype=torch.float64) * 1.5).to(dtype)  # d = 3, a sparse cloud


#: features, B, K
PERM_CASES = {"voc-bilateral": ("bilateral", 2, 21), "coco-gaussian": ("gaussian", 1, 81), "cloud": ("cloud", 3, 1),
              "one-point": ("one", 1, 2)}
FLAGS = [(False, True), (True, True), (True, False)]


def _perm_inputs(case, dtype):
    kind, B, K = PERM_CASES[case]
    f = torch.zeros(B, 2, 1, dtype=dtype) if kind == "one" else _features(kind, B, dtype)
    return torch.rand(B, K, f.shape[-1], dtype=dtype), f


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("normalize,include_self", FLAGS)
@pytest.mark.parametrize("case", list(PERM_CASES))
def test_permutohedral(sim, case, normalize, include_self, dtype):
    v, f = _perm_inputs(case, dtype)
    g = torch.randn_like(v)
    # without the self term the normalised filter divides by a row sum that nears zero on points the lattice sees as
    # isolated (the bilateral case's random colours): there float32 results of two summation orders differ by far
    # more than rtol of themselves, in proportion to the op's conditioning (tests._utils.lattice_error_scale)
    ill = dtype == torch.float32 and normalize and not include_self
    extra = [1e-5 * lattice_error_scale(x, f, normalize, include_self, backward=bwd) if ill else 0.0
             for x, bwd in ((v, False), (g, True))]
    out = sim.permutohedral_fwd(v, f, normalize, include_self)
    close(out, torch.ops.tscd.permutohedral_fwd(v, f, normalize, include_self), TOL_OP, "fwd vs cpp", extra[0])
    grad = sim.permutohedral_bwd(g, f, normalize, include_self)
    close(grad, torch.ops.tscd.permutohedral_bwd(g, f, normalize, include_self), TOL_OP, "bwd vs cpp", extra[1])
    # the transpose: <L v, g> = <v, L^T g> for the unnormalised filter
    if not normalize:
        lhs, rhs = (out * g).sum().item(), (v * grad).sum().item()
        assert abs(lhs - rhs) <= 1e-4 * abs(lhs) + 1e-9
    if case in ("voc-bilateral", "coco-gaussian") and normalize and include_self:  # the lattice approximates it
        exact = permutohedral_filter_reference(v.double(), f.double(), normalize=True, include_self=include_self)
        rel = ((out.double() - exact).norm() / exact.norm()).item()
        assert rel < 0.1, f"lattice vs exact Gaussian: relative error {rel:.3f}"


def test_permutohedral_chunks(sim):
    """Steps 3-5 run over chunks of (image, channel) pairs bounded by kMaxChunkValues (a knob of the cudasim build):
    one pair per chunk, several pairs with a remainder, and a single chunk give the same result."""
    v, f = _perm_inputs("voc-bilateral", torch.float64)  # 42 pairs, N = 99, d = 5: NP = 594 vertex slots
    pairs, NP = 42, 99 * 6
    outs = {}
    try:
        for name, limit in (("one-chunk", 1 << 25), ("5-pairs", 5 * NP + 3), ("1-pair", 10)):
            sim.set_knob("perm_max_chunk_values", limit)
            sim.clear_launch_log()
            outs[name] = (sim.permutohedral_fwd(v, f, True, False), sim.permutohedral_bwd(v, f, True, False))
            splats = [e for e in launches(sim) if e["name"].startswith("permutohedral_splat_kernel")]
            chunk = max(1, min(limit // NP, pairs))
            grids_y = [e["grid"][1] for e in splats]
            # fwd: the normalisation pass (1 pair per image) + the values; bwd the same
            norm_pass = [min(chunk, 2)] * -(-2 // min(chunk, 2))
            expected = norm_pass + [min(chunk, pairs - i) for i in range(0, pairs, chunk)]
            assert grids_y == expected * 2, (name, grids_y)
    finally:
        sim.clear_knobs()
    for name in ("5-pairs", "1-pair"):
        for a, b in zip(outs[name], outs["one-chunk"]):
            assert torch.equal(a, b), name  # the same sums in the same order


def test_permutohedral_full_table(sim, sim_order):
    """A hash table twice as full as by default (cudasim knob perm_table_factor = 1): longer probe runs, which wrap
    around the table's end; the lattice is still the CPU op's."""
    img = torch.rand(2, 3, 40, 40, dtype=torch.float64) * 255
    v = torch.rand(2, 3, 1600, dtype=torch.float64)
    # and 21 points so far apart that their 126 simplex vertices are all distinct: 126 keys in 128 slots
    cloud, cloud_v = torch.randn(2, 5, 21, dtype=torch.float64) * 1000, torch.rand(2, 3, 21, dtype=torch.float64)
    try:
        sim.set_knob("perm_table_factor", 1)
        for f, v in ((crf_features(img, 3.0), v), (crf_features(img, 10.0, 13.0), v), (cloud, cloud_v)):
            for order in ("forward", "shuffle"):
                sim_order(order, 9)
                close(sim.permutohedral_fwd(v, f, True, True), torch.ops.tscd.permutohedral_fwd(v, f, True, True),
                      TOL_OP, f"full table, {order} order")
    finally:
        sim.clear_knobs()


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
def test_permutohedral_any_order(sim, sim_order, order):
    v, f = _perm_inputs("voc-bilateral", torch.float64)
    fwd, bwd = sim.permutohedral_fwd(v, f, True, False), sim.permutohedral_bwd(v, f, True, False)
    sim_order(order, 5)
    # the hash table's vertex numbering and the splat's atomics follow the thread order: equal up to rounding
    assert_close(sim.permutohedral_fwd(v, f, True, False), fwd, rtol=1e-12, atol=1e-14, name=f"fwd {order}")
    assert_close(sim.permutohedral_bwd(v, f, True, False), bwd, rtol=1e-12, atol=1e-14, name=f"bwd {order}")


@pytest.mark.parametrize("normalize,include_self", FLAGS)
def test_permutohedral_nan_like_the_cpu(sim, normalize, include_self):
    """One NaN value: the CUDA kernels give NaN exactly where the CPU op does, in the forward and the backward
    (the CRF loss's configuration is normalised without the self term: there a lone point's denominator is 0)."""
    v, f = _perm_inputs("voc-bilateral", torch.float64)
    for i in (0, 5, 50):
        x = v.clone()
        x[0, 1, i] = float("nan")
        for op in ("permutohedral_fwd", "permutohedral_bwd"):
            out = getattr(sim, op)(x, f, normalize, include_self)
            cpu = getattr(torch.ops.tscd, op)(x, f, normalize, include_self)
            assert torch.equal(out.isnan(), cpu.isnan()), (
                f"{op} point {i}: {int(out.isnan().sum())} NaN outputs on CUDA, {int(cpu.isnan().sum())} on the CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dense_crf(sim, dtype):
    img = torch.rand(2, 3, 10, 13, dtype=torch.float64) * 255
    unary = -torch.log(torch.rand(2, 21, 130, dtype=torch.float64).softmax(1).clamp_min(1e-5)).to(dtype)
    feats = [crf_features(img, 3.0).to(dtype), crf_features(img, 20.0, 13.0).to(dtype)]
    q = sim.dense_crf_fwd(unary, feats, [3.0, 4.0], 5)
    close(q, torch.ops.tscd.dense_crf_fwd(unary, feats, [3.0, 4.0], 5), TOL_OP, "dense_crf vs cpp")

    def lattice(values, features, normalize, include_self):
        return sim.permutohedral_fwd(values.contiguous(), features, normalize, include_self)

    loop = mean_field(unary, [(feats[0], 3.0), (feats[1], 4.0)], 5, lattice)  # the reference's loop on this lattice
    close(q, loop, TOL_OP, "dense_crf vs mean-field loop")
