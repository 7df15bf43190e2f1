"""Runs the CUDA kernels under ThreadSanitizer: every GPU thread a TSan fiber (tests/cudasim/runtime.cpp), so a data
race between two GPU threads (a plain ``+=`` where ``atomicAdd`` belongs, a missing ``__syncthreads()``) is reported
and ends the process with TSan's exit code. Run through :func:`run` (it preloads the TSan runtime):

    python -m tests.cudasim.tsan_run ops              # every op of csrc/cuda/, in forward, reversed, shuffled order
    python -m tests.cudasim.tsan_run race-add         # selftest kernels that must be reported (and their fixed
    python -m tests.cudasim.tsan_run race-barrier     # versions, add / barrier / tile-loop, that must not)
    python -m tests.cudasim.tsan_run race-tile-loop
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TSAN_EXIT = 66
SCENARIOS = ("ops", "add", "race-add", "barrier", "race-barrier", "tile-loop", "race-tile-loop")


def libtsan() -> str:
    cxx = os.environ.get("CXX", "g++")
    path = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise RuntimeError(f"cudasim: ThreadSanitizer's runtime (libtsan.so) was not found by {cxx}; install it "
                           f"(Debian: libgcc-12-dev brings it with g++)")
    return path


def run(scenario: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Runs ``scenario`` in a subprocess under TSan (the library is built first, in this process, without TSan)."""
    from tests.cudasim.build import build

    build(tsan=True)
    env = {**os.environ, "LD_PRELOAD": libtsan(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TSAN_OPTIONS": f"halt_on_error=1 exitcode={TSAN_EXIT} report_signal_unsafe=0 history_size=4"}
    return subprocess.run([sys.executable, "-m", "tests.cudasim.tsan_run", scenario], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ops(sim) -> list[str]:
    """Runs every op; returns the ops whose result differs from the CPU op's (all run: TSan sees every kernel)."""
    import torch

    import tscd.kernels  # noqa: F401  (loads tscd._C: the CPU ops the results are checked against)
    from tests._utils import lattice_error_scale
    from tscd.kernels.reference.permutohedral import crf_features
    from tscd.kernels.reference.refine import position_prior

    torch.manual_seed(0)  # every order sees the same inputs, and every run the same as the last
    wrong: list[str] = []

    def check(a, b, what, atol=1e-5):
        """``a`` within ``atol + 1e-4 |b|`` of ``b`` elementwise (``atol`` may be a tensor), NaN where ``b`` is."""
        err, tol = (a - b).abs(), atol + 1e-4 * b.abs()
        bad = ~((err <= tol) | (a.isnan() & b.isnan()))
        if bad.any():
            wrong.append(f"{what} ({int(bad.sum())}/{b.numel()} elements, worst error / tolerance "
                         f"{(err / tol)[bad].nan_to_num(float('inf')).max().item():.3g})")

    dil = [1, 2, 4]
    img, cam = torch.rand(2, 3, 17, 17), torch.randn(2, 5, 17, 17)  # 289 pixels: two blocks; 5 channels: two chunks
    nc = torch.tensor([5, 3])
    for mode, scale, aux, prior in ((0, 4.0, -0.01, None), (1, 1 / 0.3, 0.01, position_prior(dil, 0.3))):
        args = (dil, 2, mode, scale, aux, prior)
        check(sim.refine_fwd(img, cam, nc, *args), torch.ops.tscd.refine_fwd(img, cam, nc, *args), "refine_fwd")
        check(sim.refine_bwd(cam, img, nc, *args), torch.ops.tscd.refine_bwd(cam, img, nc, *args), "refine_bwd")
        w = (dil, mode, scale, aux, prior)
        check(sim.refine_weights(img, *w), torch.ops.tscd.refine_weights(img, *w), "refine_weights")
    t1, t2, s1, s2 = torch.randn(2, 70, 2), torch.randn(2, 40, 2), torch.randn(2, 70, 3), torch.randn(2, 40, 3)
    off, g = torch.randn(2, 70), torch.randn(2)
    # per image a sum of 70 x 40 signed terms that can cancel: the tolerance follows the sum of their magnitudes
    terms = (s1.double() @ s2.double().transpose(1, 2)).clamp_min(0) * (
        (t1.double() @ t2.double().transpose(1, 2)).abs() + off.double().abs().unsqueeze(2))
    check(sim.correlation_fwd(t1, t2, s1, s2, off, True), torch.ops.tscd.correlation_fwd(t1, t2, s1, s2, off, True),
          "correlation_fwd", atol=1e-5 + 1e-6 * terms.sum((1, 2)).float())
    for a, b in zip(sim.correlation_bwd(g, t1, t2, s1, s2, off, True, True),
                    torch.ops.tscd.correlation_bwd(g, t1, t2, s1, s2, off, True, True)):
        check(a, b, "correlation_bwd")
    im = torch.rand(2, 3, 6, 7) * 255
    f, v = crf_features(im, 4.0, 15.0), torch.rand(2, 3, 42)
    sim.set_knob("perm_max_chunk_values", 2 * 42 * 6)  # two (image, channel) pairs per chunk
    for normalize, include_self in ((False, True), (True, True), (True, False)):
        for op in ("permutohedral_fwd", "permutohedral_bwd"):
            # the tolerance follows the magnitude that rounding scales with: without the self term the normalised
            # filter's denominator crosses zero on isolated points (random colours), where float32 results of two
            # summation orders differ by far more than 1e-4 of themselves
            scale = lattice_error_scale(v, f, normalize, include_self, backward=op.endswith("bwd")).float()
            check(getattr(sim, op)(v, f, normalize, include_self),
                  getattr(torch.ops.tscd, op)(v, f, normalize, include_self), op, atol=1e-5 + 1e-4 * scale)
    sim.clear_knobs()
    unary = torch.rand(1, 4, 42)
    feats = [crf_features(im[:1], 3.0), crf_features(im[:1], 20.0, 13.0)]
    check(sim.dense_crf_fwd(unary, feats, [3.0, 4.0], 2), torch.ops.tscd.dense_crf_fwd(unary, feats, [3.0, 4.0], 2),
          "dense_crf_fwd")
    return wrong


def main() -> None:
    scenario = sys.argv[1] if len(sys.argv) > 1 else "ops"
    if scenario not in SCENARIOS:
        raise SystemExit(f"tsan_run: scenario must be one of {SCENARIOS}; got {scenario!r}")
    import torch

    from tests.cudasim.build import load

    torch.set_num_threads(1)
    sim = load(tsan=True)
    if not sim.tsan():
        raise SystemExit("tsan_run: the library was not built for ThreadSanitizer")
    if scenario == "ops":
        wrong = []
        for order in ("forward", "reverse", "shuffle"):
            sim.set_order(order, 11)
            wrong += [f"{op} in {order} order" for op in _ops(sim)]
            print(f"ops ({order} order): no data race", flush=True)
        if wrong:
            raise SystemExit(f"cudasim under TSan: results differ from the CPU ops': {', '.join(wrong)}")
    elif scenario in ("add", "race-add"):
        out = sim.selftest_add(torch.zeros(1), 300, scenario == "add")
        print(f"{scenario}: {out.item()}")
    elif scenario in ("barrier", "race-barrier"):
        x = torch.rand(256)
        out = sim.selftest_block_sum(x, 64, 0 if scenario == "barrier" else 1)
        print(f"{scenario}: {out.tolist()}")
    else:
        out = sim.selftest_tile_loop(torch.rand(3 * 32), 32, 3, scenario == "tile-loop")
        print(f"{scenario}: {out.tolist()}")


if __name__ == "__main__":
    main()
