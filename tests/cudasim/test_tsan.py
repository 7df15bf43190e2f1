"""The CUDA kernels under ThreadSanitizer (tests/cudasim/tsan_run.py): every op of csrc/cuda/ is race-free in every
block/thread order, and the sanitizer does report the bugs it is there for (a plain ``+=`` where several GPU threads
update one address, a missing ``__syncthreads()``), so a clean run means something."""
from __future__ import annotations

import pytest

from tests.cudasim.tsan_run import TSAN_EXIT, _ops, run
from tests.kernels.test_cuda_sim import COVERED


def _report(result) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"


class _OneWrongElement:
    """cudasim's ops, with one element of ``op``'s outputs moved by ``rel`` of the largest output magnitude (a lost
    term of a sum, a missed atomic)."""

    def __init__(self, sim, op, rel):
        self.sim, self.op, self.rel = sim, op, rel

    def __getattr__(self, name):
        fn = getattr(self.sim, name)
        if name != self.op:
            return fn

        def wrong(*args):
            out = fn(*args)
            first = out[0] if isinstance(out, (tuple, list)) else out
            flat = first.view(-1)
            i = flat.numel() // 2
            flat[i] += self.rel * first.abs().max()
            return out

        return wrong


def test_results_are_checked_without_tsan(sim):
    """The result check of ``tsan_run ops``, on the uninstrumented library: the right results pass in every order
    (the tolerances follow the magnitudes that rounding scales with, where sums cancel or the excluded-self
    denominator nears zero: see tests._utils.lattice_error_scale), and one element off by 0.1 % of the output's
    magnitude fails, in every op."""
    for order in ("forward", "reverse", "shuffle"):
        sim.set_order(order, 11)
        assert _ops(sim) == [], order
    sim.set_order("", 0)
    for op in sorted(COVERED):  # every op of csrc/cuda/ (test_cuda_sim keeps the list complete)
        wrong = _ops(_OneWrongElement(sim, op, 1e-3))
        assert wrong and all(w.startswith(op) for w in wrong), (op, wrong)


@pytest.mark.slow  # builds a second, instrumented library (about two minutes on 2 cores)
def test_every_cuda_op_is_race_free():
    result = run("ops")
    assert result.returncode == 0 and "ThreadSanitizer" not in result.stderr, _report(result)
    assert result.stdout.count("no data race") == 3, _report(result)


@pytest.mark.slow
@pytest.mark.parametrize("fixed,racy", [("add", "race-add"), ("barrier", "race-barrier"),
                                        ("tile-loop", "race-tile-loop")])
def test_races_are_reported(fixed, racy):
    ok = run(fixed)
    assert ok.returncode == 0 and "ThreadSanitizer" not in ok.stderr, _report(ok)
    bad = run(racy)
    assert bad.returncode == TSAN_EXIT, _report(bad)
    assert "WARNING: ThreadSanitizer: data race" in bad.stderr and "selftest.cu" in bad.stderr, _report(bad)
