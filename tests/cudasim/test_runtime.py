"""cudasim itself (tests/cudasim/selftest.cu): it must enforce what a GPU enforces, or the kernel tests that run on
it prove less than they claim. Launch geometry and every launch limit, barriers as real barriers and divergence as
an error, shared memory poisoned with NaN, the shared-memory opt-in, atomics, block/thread orders, the watchdog."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _geometry(sim, grid, block):
    rows = sim.selftest_geometry(list(grid), list(block))
    return rows


@pytest.mark.parametrize("grid,block", [((1, 1, 1), (1, 1, 1)), ((3, 2, 1), (4, 2, 1)), ((2, 3, 2), (5, 1, 3)),
                                        ((7, 1, 1), (256, 1, 1)), ((1, 1, 1), (1024, 1, 1)), ((1, 2, 1), (8, 8, 16))])
def test_geometry_covers_every_thread_once(sim, grid, block):
    rows = _geometry(sim, grid, block)
    n = rows.shape[0]
    tpb, blocks = block[0] * block[1] * block[2], grid[0] * grid[1] * grid[2]
    assert n == tpb * blocks
    assert (rows[:, 6] == tpb).all() and (rows[:, 7] == blocks).all()
    for d in range(3):
        assert rows[:, d].max() == block[d] - 1 and rows[:, 3 + d].max() == grid[d] - 1
    assert sorted(rows[:, 8].tolist()) == list(range(n))  # every thread ran exactly once


def test_forward_order_runs_blocks_and_threads_in_index_order(sim):
    rows = _geometry(sim, (3, 2, 1), (4, 1, 1))
    assert rows[:, 8].tolist() == list(range(24))


def test_reverse_and_shuffled_orders(sim, sim_order):
    sim_order("reverse")
    rows = _geometry(sim, (3, 2, 1), (4, 1, 1))
    assert rows[:, 8].tolist() == list(range(23, -1, -1))
    sim_order("shuffle", 1)
    a = _geometry(sim, (8, 1, 1), (16, 1, 1))[:, 8]
    sim_order("shuffle", 2)
    b = _geometry(sim, (8, 1, 1), (16, 1, 1))[:, 8]
    assert sorted(a.tolist()) == list(range(128))
    assert a.tolist() != list(range(128)) and a.tolist() != b.tolist()
    block_of_step = (a.argsort() // 16).tolist()  # which block ran at each step: blocks are not interleaved ...
    assert all(block_of_step[i] == block_of_step[i - i % 16] for i in range(128))
    assert block_of_step[::16] != list(range(8))  # ... but run in a shuffled order


def test_order_from_the_environment():
    code = ("import torch; from tests.cudasim.build import load; s = load(); "
            "print(s.selftest_geometry([2, 1, 1], [3, 1, 1])[:, 8].tolist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "TSCD_CUDASIM_ORDER": "reverse", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[5, 4, 3, 2, 1, 0]"


@pytest.mark.parametrize("grid,block,what", [
    ((1, 1, 1), (1025, 1, 1), "1025 threads, more than 1024"),
    ((1, 1, 1), (32, 32, 2), "2048 threads"),
    ((1, 1, 1), (1, 1, 65), "block dimension limits"),
    ((1, 65536, 1), (1, 1, 1), "at most 65535"),
    ((1, 1, 65536), (1, 1, 1), "at most 65535"),
    ((0, 1, 1), (1, 1, 1), "empty dimension"),
    ((1, 1, 1), (0, 1, 1), "empty dimension"),
])
def test_launch_limits_refuse_and_run_nothing(sim, grid, block, what):
    sim.clear_launch_log()
    with pytest.raises(RuntimeError, match=r"CUDA error: invalid configuration argument \(cudasim: launch of "
                                           r"geometry_kernel at selftest.cu:\d+ refused: .*" + what):
        sim.selftest_geometry(list(grid), list(block))
    log = json.loads(sim.launch_log())
    assert len(log) == 1 and log[0]["error"]


def test_grid_at_the_limits_runs(sim):
    rows = _geometry(sim, (1, 65535, 1), (1, 1, 1))
    assert rows.shape[0] == 65535 and rows[:, 4].max() == 65534
    rows = _geometry(sim, (1, 1, 65535), (1, 1, 1))
    assert rows[:, 5].max() == 65534


def test_error_is_cleared_after_it_was_raised(sim):
    with pytest.raises(RuntimeError):
        sim.selftest_geometry([1, 1, 1], [2048, 1, 1])
    assert _geometry(sim, (1, 1, 1), (2, 1, 1)).shape[0] == 2  # no stale error


def test_barrier_block_reduction(sim):
    x = torch.rand(1000)
    out = sim.selftest_block_sum(x, 128, 0)
    expected = torch.nn.functional.pad(x, (0, 24)).view(8, 128).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_missing_barrier_reads_poison(sim):
    """Without the barrier the first thread reduces elements no thread has written yet: NaN, not a plausible sum."""
    out = sim.selftest_block_sum(torch.rand(256), 128, 1)
    assert torch.isnan(out).all()


def test_tile_loop(sim):
    x = torch.rand(3 * 32)
    expected = x.view(3, 32).roll(-1, 1).sum(0)
    torch.testing.assert_close(sim.selftest_tile_loop(x, 32, 3, True), expected)
    assert torch.isnan(sim.selftest_tile_loop(x, 32, 3, False)).any()  # the first round reads poison


def test_uninitialised_shared_memory_is_nan(sim):
    assert torch.isnan(sim.selftest_block_sum(torch.rand(256), 128, 4)).all()
    assert torch.isnan(sim.selftest_smem_poison(16)).all()


def test_divergent_barriers_are_an_error(sim):
    with pytest.raises(RuntimeError, match=r"unspecified launch failure \(cudasim: barrier divergence in block "
                                           r"\(0, 0, 0\): 64 thread\(s\) wait at __syncthreads\(\) "
                                           r"tests/cudasim/selftest.cu:\d+ .*64 thread\(s\) wait at "
                                           r"__syncthreads\(\) tests/cudasim/selftest.cu:\d+"):
        sim.selftest_block_sum(torch.rand(256), 128, 2)


def test_exit_while_others_wait_is_an_error(sim):
    with pytest.raises(RuntimeError, match=r"64 thread\(s\) have exited .*every thread of a block must reach the "
                                           r"same __syncthreads\(\) \[kernel block_sum_kernel"):
        sim.selftest_block_sum(torch.rand(256), 128, 3)


def test_divergence_is_found_in_every_order(sim, sim_order):
    for name in ("reverse", "shuffle"):
        sim_order(name, 3)
        with pytest.raises(RuntimeError, match="barrier divergence"):
            sim.selftest_block_sum(torch.rand(256), 128, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_atomics(sim, dtype):
    assert sim.selftest_add(torch.zeros(1, dtype=dtype), 1000, True).item() == 1000


def test_shared_memory_opt_in(sim):
    assert sim.selftest_smem(49152, 0).tolist() == [(t + 1) % 32 for t in range(32)]
    with pytest.raises(RuntimeError, match=r"invalid argument .*60000 bytes of dynamic shared memory exceed the "
                                           r"kernel's limit of 49152 bytes .*cudaFuncSetAttribute"):
        sim.selftest_smem(60000, 0)
    assert sim.selftest_smem(60000, 60000).tolist()[0] == 1
    with pytest.raises(RuntimeError, match=r"cudaFuncSetAttribute\(MaxDynamicSharedMemorySize, 300000\): this GPU "
                                           r"allows at most 232448"):
        sim.selftest_smem(300000, 300000)
    old = sim.set_shared_memory_optin(166912)  # an A100
    try:
        with pytest.raises(RuntimeError, match="at most 166912"):
            sim.selftest_smem(200000, 200000)
    finally:
        sim.set_shared_memory_optin(old)


def test_watchdog_names_the_hung_kernel_and_block():
    code = "from tests.cudasim.build import load; load().selftest_hang()"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TSCD_CUDASIM_TIMEOUT": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 124, out.stderr[-2000:]
    assert "cudasim watchdog: kernel hang_kernel (launched at selftest.cu:" in out.stderr
    assert "block (0, 0) has run for" in out.stderr and "the last thread resumed was (0, 0, 0)" in out.stderr


def test_a_faulting_kernel_is_named():
    code = "from tests.cudasim.build import load; load().selftest_fault()"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert "cudasim: kernel fault_kernel (launched at selftest.cu:" in out.stderr, out.stderr[-2000:]
    assert "crashed with SIGSEGV at address (nil) in block (1, 0), thread (1, 0, 0)" in out.stderr
