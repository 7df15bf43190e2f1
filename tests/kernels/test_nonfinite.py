"""Non-finite and huge inputs (issue 14, items 1-2): no op may crash or read out of bounds on any float input, and
every backend must treat NaN/inf like the torch reference (a diverging model must not be hidden by a fused kernel).

* A fuzz test feeds every public op random tiny shapes with NaN, +-inf, +-1e12 or denormals in one input, on every
  CPU backend (the native ones in a child process, so that a segfault fails the test instead of killing pytest),
  and checks: no crash; either the same ValueError as the reference (naming the op and the argument) or the
  reference's pattern of NaN / +inf / -inf, forward and backward (values too for the ops with exact math).
* The documented semantics, checked directly: the permutohedral filter's NaN channels and images, dense_crf's
  errors, the issue's correlation example, the lattice's own behaviour on invalid points (raw C++ op).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._utils import assert_close
from tests.conftest import require_backend
from tests.kernels._nonfinite_cases import OPS, make_case, num_cases, run_case
from tscd.kernels import correlation_loss, dense_crf, dense_energy_loss, permutohedral_filter, refine
from tscd.kernels._ext import has_cpp

REPO = Path(__file__).resolve().parents[2]
CASES_SCRIPT = Path(__file__).with_name("_nonfinite_cases.py")
SUPPORTED = {"refine": ("triton", "cpp"), "correlation_loss": ("triton", "cpp"), "permutohedral_filter": ("cpp",),
             "dense_energy_loss": ("cpp",), "dense_crf": ("cpp",)}
EXACT = {"refine", "correlation_loss"}  # the fused math is the reference's: finite values are compared too
RAISES = {"dense_crf"}  # the inference op rejects non-finite inputs; the others propagate NaN

needs_cpp = pytest.mark.skipif(not has_cpp(), reason="tscd._C not built")


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_INTERPRET", "1")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_child(args: list[str], what: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=_child_env(), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        pytest.fail(f"{what}: the child process crashed ({how}); its stderr ends with:\n{tail}")
    return proc


def _same_pattern(got: torch.Tensor, ref: torch.Tensor, what: str, exact: bool) -> None:
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    got, ref = got.double(), ref.double()
    for kind, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        g, r = fn(got), fn(ref)
        if not torch.equal(g, r):
            pytest.fail(f"{what}: {kind} entries differ from the reference: {int(g.sum())} vs {int(r.sum())} of "
                        f"{ref.numel()} (first mismatch at {tuple(int(i) for i in (g != r).nonzero()[0])})")
    finite = torch.isfinite(ref)
    if exact and bool(finite.any()):
        scale = float(ref[finite].abs().max())
        assert_close(got[finite], ref[finite], rtol=2e-3, atol=1e-4 * (1 + scale), name=what)


def _check_against_reference(case: dict, res: dict, ref: dict, backend: str) -> None:
    op = case["op"]
    what = f"{op}[{backend}] case {case['index']} ({case['target']} <- {case['value']})"
    if "error" in ref:
        kind, msg = ref["error"]
        assert kind == "ValueError" and msg.startswith(f"{op}:") and f"`{case['target']}`" in msg, \
            f"{what}: the reference raised an unclear error: {kind}: {msg}"
        assert "error" in res and res["error"][0] == kind, f"{what}: the reference raised {kind} ({msg}), the " \
                                                           f"backend returned {res.get('error', 'a result')}"
        return
    assert "error" not in res, f"{what}: raised {res['error']} where the reference returns a result"
    _same_pattern(res["out"], ref["out"], f"{what} output", op in EXACT)
    assert res["grads"].keys() == ref["grads"].keys(), f"{what}: gradients for {sorted(res['grads'])} vs " \
                                                       f"{sorted(ref['grads'])}"
    for name, g in ref["grads"].items():
        _same_pattern(res["grads"][name], g, f"{what} grad of {name}", op in EXACT)


def _expect_semantics(case: dict, ref: dict) -> None:
    """What the docstrings promise, on the reference (the backends are then held to the reference)."""
    op, value = case["op"], case["value"]
    nonfinite = value is not None and not abs(value) < float("inf")
    if op in RAISES:
        if nonfinite or (value is not None and abs(value) >= 1e12 and case["target"] == "image"):
            assert "error" in ref, f"{op} case {case['index']}: {case['target']} <- {value} must raise ValueError"
        else:
            assert "error" not in ref, f"{op} case {case['index']}: unexpected {ref.get('error')}"
        return
    assert "error" not in ref, f"{op} case {case['index']}: ops other than dense_crf propagate NaN, got {ref['error']}"
    if value is None or value == 1e-40:
        assert bool(torch.isfinite(ref["out"]).all()), f"{op} case {case['index']}: clean input, non-finite output"


@pytest.mark.parametrize("op", OPS)
def test_reference_nonfinite_semantics(op):
    for i in range(num_cases(op)):
        case = make_case(op, i)
        _expect_semantics(case, run_case(case, "torch"))


@pytest.mark.parametrize("op,backend", [(op, b) for op in OPS for b in SUPPORTED[op]])
def test_fuzz_nonfinite_matches_reference(op, backend, tmp_path):
    require_backend(op, backend, "cpu", SUPPORTED[op] + ("torch",))
    cases = [make_case(op, i) for i in range(num_cases(op))]
    torch.save(cases, tmp_path / "cases.pt")
    _run_child([str(CASES_SCRIPT), backend, str(tmp_path / "cases.pt"), str(tmp_path / "results.pt")],
               f"{op} on backend {backend}")
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    assert len(results) == len(cases)
    for case, res in zip(cases, results):
        _check_against_reference(case, res, run_case(case, "torch"), backend)


# ----------------------------------------------------------------------------------------------
# The documented semantics, directly
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e12, 2.0 ** 21])
def test_filter_bad_feature_poisons_its_image(backend, bad):
    v = torch.rand(2, 3, 30, requires_grad=True)
    f = torch.randn(2, 5, 30)
    f[1, 3, 7] = bad
    out = permutohedral_filter(v, f, backend=backend)
    assert bool(out[1].isnan().all()) and bool(torch.isfinite(out[0]).all())
    out.backward(torch.ones_like(out))
    assert bool(v.grad[1].isnan().all()) and bool(torch.isfinite(v.grad[0]).all())


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("normalize", [False, True])
def test_filter_bad_value_poisons_its_channel(backend, normalize):
    v = torch.rand(1, 3, 30)
    v[0, 1, 4] = float("inf")
    f = torch.randn(1, 2, 30)
    out = permutohedral_filter(v, f, normalize=normalize, backend=backend)
    assert bool(out[0, 1].isnan().all())
    assert bool(torch.isfinite(out[0, [0, 2]]).all())


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_filter_largest_valid_feature_is_finite(backend):
    f = torch.randn(1, 2, 20, dtype=torch.float64)
    f[0, 0, 3] = 2.0 ** 20  # the edge of the lattice's range: still a point, far from all others
    out = permutohedral_filter(torch.ones(1, 1, 20, dtype=torch.float64), f, backend=backend)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_energy_loss_nan_pixel_gives_nan_loss_and_grad(backend):
    im = torch.rand(2, 3, 8, 10) * 255
    im[0, 1, 4, 4] = float("nan")  # an even pixel: kept by the 0.5 nearest resize
    probs = torch.softmax(torch.randn(2, 3, 8, 10), 1).requires_grad_()
    loss = dense_energy_loss(im, probs, torch.ones(2, 8, 10), torch.zeros(2, 8, 10, dtype=torch.long),
                             backend=backend)
    assert bool(loss.isnan())
    loss.backward()
    assert bool(probs.grad[0].isnan().any()) and bool(torch.isfinite(probs.grad[1]).all())


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("name,bad,match", [
    ("image", float("nan"), r"dense_crf: `image` must hold finite values; got nan at index \(0, 0, 0, 0\)"),
    ("image", float("-inf"), r"dense_crf: `image` must hold finite values"),
    ("image", 1e12, r"dense_crf: `image` values up to 1e\+12 .* beyond the lattice's range"),
    ("probs", float("nan"), r"dense_crf: `probs` must hold finite values"),
])
def test_dense_crf_rejects_nonfinite(backend, name, bad, match):
    t = {"image": torch.rand(1, 3, 6, 7) * 255, "probs": torch.softmax(torch.randn(1, 3, 6, 7), 1)}
    t[name][0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=match):
        dense_crf(t["image"], t["probs"], backend=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_check_finite_fast_path(dtype):
    """check_finite's float64-sum shortcut: no false alarm where finite values overflow the sum (float64), and
    every NaN / inf still found, wherever it sits and whatever the other values (a +inf and a -inf, or a NaN among
    huge values, must not cancel or hide)."""
    from tscd.kernels._checks import check_finite

    big = torch.finfo(dtype).max
    check_finite("op", "t", torch.full((4, 5), big, dtype=dtype))  # finite; the float64 sum overflows for float64
    check_finite("op", "t", torch.arange(6, dtype=torch.uint8))  # integers: nothing to check
    for bad in ([float("inf"), float("-inf")], [float("nan")], [float("-inf")]):
        t = torch.full((4, 5), big if dtype == torch.float64 else 1.0, dtype=dtype)
        t.view(-1)[[7, 13][:len(bad)]] = torch.tensor(bad, dtype=dtype)
        with pytest.raises(ValueError, match=r"op: `t` must hold finite values; got .* at index \(1, 2\)"):
            check_finite("op", "t", t)


@pytest.mark.parametrize("kw,match", [
    (dict(gauss_compat=float("nan")), r"`gauss_compat` must be finite"),
    (dict(bilateral_srgb=float("inf")), r"`bilateral_srgb` must be > 0 and finite"),
    (dict(gauss_sxy=1e-9), r"`gauss_sxy` = 1e-09 is too small for a 7-pixel side"),
])
def test_dense_crf_rejects_bad_scalars(kw, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(torch.rand(1, 3, 6, 7) * 255, torch.softmax(torch.randn(1, 3, 6, 7), 1), backend="torch", **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(weight=float("nan")), r"dense_energy_loss: `weight` must be finite"),
    (dict(sigma_rgb=float("inf")), r"`sigma_rgb` must be > 0 and finite"),
    (dict(sigma_xy=1e-9), r"`sigma_xy \* scale` = 5e-10 is too small"),
])
def test_energy_loss_rejects_bad_scalars(kw, match):
    with pytest.raises(ValueError, match=match):
        dense_energy_loss(torch.rand(1, 3, 6, 6) * 255, torch.softmax(torch.randn(1, 2, 6, 6), 1),
                          torch.ones(1, 6, 6), torch.zeros(1, 6, 6, dtype=torch.long), backend="torch", **kw)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("num_iter", [0, 2])
def test_refine_skipped_channels_are_zero_even_with_nan(backend, num_iter):
    require_backend("refine_fwd", backend, "cpu", ("triton", "cpp", "torch"))
    image = torch.rand(2, 3, 5, 6)
    cam = torch.rand(2, 3, 5, 6)
    cam[0, 2, 1, 1] = float("nan")  # channel 2 of image 0 is skipped
    cam[1, 0, 2, 3] = float("inf")  # channel 0 of image 1 is used: NaN/inf spread in it
    out = refine(image, cam, num_iter=num_iter, dilations=(1,), num_channels=[2, 3], backend=backend)
    assert bool((out[0, 2] == 0).all())
    assert bool(torch.isfinite(out[0, :2]).all()) and bool(torch.isfinite(out[1, 1:]).all())
    assert not bool(torch.isfinite(out[1, 0]).all())


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_correlation_dense_nan_student_is_nan(backend, bad):
    """The issue's example: one NaN in student1 (dense=True) gave a finite loss on cpp, NaN on torch."""
    require_backend("correlation_fwd", backend, "cpu", ("triton", "cpp", "torch"))
    g = torch.Generator().manual_seed(3)
    t1, t2, s1, s2 = (torch.randn(1, c, 5, 6, generator=g) for c in (4, 4, 3, 3))
    s1[0, 1, 2, 2] = bad
    s1.requires_grad_(True)
    s2.requires_grad_(True)
    loss = correlation_loss(t1, t2, s1, s2, dense=True, backend=backend)
    assert bool(loss.isnan()), f"{backend}: {loss.item()}"
    loss.backward()
    ref_s1, ref_s2 = (x.detach().clone().requires_grad_(True) for x in (s1, s2))
    correlation_loss(t1, t2, ref_s1, ref_s2, dense=True, backend="torch").backward()
    assert torch.equal(s1.grad.isnan(), ref_s1.grad.isnan()) and torch.equal(s2.grad.isnan(), ref_s2.grad.isnan())


RAW_OPS = r"""
import torch, tscd.kernels  # registers the ops
nan, inf = float("nan"), float("inf")
for bad in (nan, inf, -inf, 1e12, -1e12, 3e38):
    for d in (1, 2, 5, 8):
        f = torch.randn(2, d, 64)
        f[1, d - 1, 9] = bad
        v = torch.rand(2, 3, 64)
        for normalize in (False, True):
            for include_self in (False, True):
                out = torch.ops.tscd.permutohedral_fwd(v, f, normalize, include_self)
                assert bool(out[1, :, 9].isnan().all()), (bad, d, "the invalid point's own output must be NaN")
                assert bool(torch.isfinite(out[0]).all()), (bad, d, "an image without invalid points is finite")
                g = torch.ops.tscd.permutohedral_bwd(v, f, normalize, include_self)
                assert bool(torch.isfinite(g[0]).all()), (bad, d)
    f = torch.full((1, 5, 50), bad)  # every point invalid
    assert bool(torch.ops.tscd.permutohedral_fwd(torch.rand(1, 2, 50), f, False, True).isnan().all())
    feats = [torch.randn(1, 2, 40), torch.randn(1, 5, 40)]
    feats[1][0, 2, 11] = bad
    q = torch.ops.tscd.dense_crf_fwd(torch.rand(1, 3, 40), feats, [3.0, 4.0], 3)
    assert bool(q[0, :, 11].isnan().all()), bad
print("ok")
"""


@needs_cpp
def test_raw_lattice_ops_flag_invalid_points_without_crashing():
    """The C++ ops on their own (no Python poison): an invalid feature (NaN, inf, beyond 2^20) never crashes the
    process (dense_crf segfaulted before) and makes the outputs that read its vertices NaN."""
    proc = _run_child(["-c", RAW_OPS], "raw permutohedral ops on non-finite features", timeout=300)
    assert proc.stdout.strip().endswith("ok")
