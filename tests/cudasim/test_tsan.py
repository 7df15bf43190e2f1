"""The CUDA kernels under ThreadSanitizer (tests/cudasim/tsan_run.py): every op of csrc/cuda/ is race-free in every
block/thread order, and the sanitizer does report the bugs it is there for (a plain ``+=`` where several GPU threads
update one address, a missing ``__syncthreads()``), so a clean run means something."""
from __future__ import annotations

import pytest

from tests.cudasim.tsan_run import TSAN_EXIT, run

pytestmark = pytest.mark.slow  # builds a second, instrumented library (about two minutes on 2 cores)


def _report(result) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"


def test_every_cuda_op_is_race_free():
    result = run("ops")
    assert result.returncode == 0 and "ThreadSanitizer" not in result.stderr, _report(result)
    assert result.stdout.count("no data race") == 3, _report(result)


@pytest.mark.parametrize("fixed,racy", [("add", "race-add"), ("barrier", "race-barrier"),
                                        ("tile-loop", "race-tile-loop")])
def test_races_are_reported(fixed, racy):
    ok = run(fixed)
    assert ok.returncode == 0 and "ThreadSanitizer" not in ok.stderr, _report(ok)
    bad = run(racy)
    assert bad.returncode == TSAN_EXIT, _report(bad)
    assert "WARNING: ThreadSanitizer: data race" in bad.stderr and "selftest.cu" in bad.stderr, _report(bad)
