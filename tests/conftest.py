"""Shared test set-up.

* Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET=1`` is set here, before
  any tscd module is imported (the flag is read when a kernel is decorated).
* ``backend_device`` parametrises a test over (backend, device) pairs. A pair is skipped only when
  this machine cannot run it (no GPU); a CPU backend that should exist but does not fails, when it
  is named in ``TSCD_REQUIRE_BACKENDS`` (CI sets ``cpp,triton,torch``).
* Every test starts from the same seed: 0, or ``TSCD_TEST_SEED``. Running the suite under other seeds finds the
  tests that pass only by the luck of their random inputs (a tolerance below what rounding can reach).
* Test tiers: the ``slow`` marker is on the end-to-end tests (demo quality, the GPU check's dry run, training runs
  through the command line or in subprocesses, resume and DDP runs, installs), on the kinds in :data:`SLOW_KINDS`
  and, without a GPU, on the Triton interpreter's sweeps and CPU bf16 runs; ``pytest -m "not slow"``
  (``make test-fast``) leaves them out, ``make test`` (CI) runs everything.
* The tiny training configuration the tests share is ``tests._utils.TINY_CONFIG`` (``tiny_overrides``,
  ``write_tiny_config``).
"""
import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test-fast`: one process per core; more threads only contend
    torch.set_num_threads(1)
REQUIRED = {b.strip() for b in os.environ.get("TSCD_REQUIRE_BACKENDS", "").split(",") if b.strip()}
try:
    TEST_SEED = int(os.environ.get("TSCD_TEST_SEED", "0"))
except ValueError:
    raise pytest.UsageError(f"TSCD_TEST_SEED must be an integer; got {os.environ['TSCD_TEST_SEED']!r}") from None

BACKEND_DEVICES = [("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu"),
                   ("torch", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running; deselect with -m 'not slow'")


#: Kinds of test that are slow wherever they live: float64 gradchecks, the fuzzers, the C++ instruction-set sweeps
#: (one subprocess per instruction set).
SLOW_KINDS: tuple[str, ...] = ("gradcheck", "fuzz", "every_instruction_set")


def _slow_without_gpu(item) -> bool:
    """Without a GPU: a test that runs Triton kernels in the CPU interpreter (a ``triton`` parametrisation),
    compiles every kernel with the real compiler (test_triton_compile), or runs bf16 autocast on the CPU (no bf16
    units on most CPUs): minutes in all on 2 cores."""
    if HAS_GPU:
        return False
    if item.module is not None and item.module.__name__.endswith("test_triton_compile"):
        return True
    callspec = getattr(item, "callspec", None)
    return "bf16" in item.name or (callspec is not None and "triton" in callspec.id)


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if _slow_without_gpu(item) or any(kind in item.name for kind in SLOW_KINDS):
            item.add_marker(slow)  # `make test` (CI) runs them; `make test-fast` leaves them out
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: that also
            # matches a parent folder named gpu (e.g. a checkout in .../gpu), skipping every test
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)
    torch.manual_seed(TEST_SEED)


def require_backend(op: str, backend: str, device: str, supported: tuple[str, ...]) -> None:
    """Skip (or fail, if required) a (backend, device) pair this machine or op cannot run."""
    from tscd.kernels._backend import why_unavailable

    if backend not in supported:
        pytest.skip(f"{op} has no {backend} backend")
    if device == "cuda" and not HAS_GPU:
        pytest.skip("no CUDA GPU on this machine")
    why = why_unavailable(backend, torch.device(device), op)
    if why is not None:
        if backend in REQUIRED:
            pytest.fail(f"backend {backend} is required (TSCD_REQUIRE_BACKENDS) but unavailable: {why}")
        pytest.skip(why)


@pytest.fixture(params=BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
def backend_device(request):
    """(backend, device) pair; tests call ``require_backend`` with their op's name and backends."""
    return request.param


@pytest.fixture(scope="session")
def sim(request):
    """``torch.ops.tscd_cudasim``: the CUDA sources of csrc/cuda/ executed on the CPU by cudasim (tests/cudasim/),
    built once per session (and cached across runs by a hash of the sources)."""
    from tests.cudasim.build import load

    ops = load()
    try:  # a hung or faulting kernel ends the process: its message must reach the real stderr, not the capture
        from _pytest.faulthandler import fault_handler_stderr_fd_key

        ops.set_message_fd(request.config.stash[fault_handler_stderr_fd_key])
    except (ImportError, KeyError):
        pass
    return ops


@pytest.fixture
def sim_order(sim):
    """``sim_order("reverse" | "shuffle", seed)`` sets cudasim's block and thread order for one test."""
    yield lambda name, seed=0: sim.set_order(name, seed)
    sim.set_order("", 0)
