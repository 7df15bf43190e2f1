"""Backend resolution, the extension build, and `tscd info`."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tscd.cli import main
from tscd.kernels import _backend, _ext
from tscd.kernels._backend import resolve_backend

ALL = ("triton", "cuda", "cpp", "torch")
CPU = torch.device("cpu")


def test_auto_picks_cpp_on_cpu_when_built():
    expected = "cpp" if _ext.has_cpp() else "torch"
    assert resolve_backend("refine_fwd", "auto", CPU, ALL) == expected
    assert resolve_backend("refine_fwd", None, CPU, ALL) == expected
    assert resolve_backend("refine_fwd", "auto", CPU, ("torch",)) == "torch"


def test_env_preference(monkeypatch):
    monkeypatch.setenv("TSCD_BACKEND", "torch")
    assert resolve_backend("refine_fwd", "auto", CPU, ALL) == "torch"
    monkeypatch.setenv("TSCD_BACKEND", "cuda")  # cannot run on CPU tensors: falls back, with a warning
    assert resolve_backend("refine_fwd", "auto", CPU, ALL) in ("cpp", "torch")


def test_unknown_and_unsupported_backends():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        resolve_backend("refine_fwd", "fastest", CPU, ALL)
    with pytest.raises(RuntimeError, match="backend 'triton' is not implemented for this op; available: cpp, torch"):
        resolve_backend("perm_fwd", "triton", CPU, ("cpp", "torch"))


def test_cuda_backend_on_cpu_tensor_says_why():
    with pytest.raises(RuntimeError, match="the cuda backend runs on CUDA tensors, but the inputs are on cpu"):
        resolve_backend("refine_fwd", "cuda", CPU, ALL)


def test_cpp_backend_on_cuda_tensor_says_why():
    with pytest.raises(RuntimeError, match="the cpp backend runs on CPU tensors"):
        resolve_backend("refine_fwd", "cpp", torch.device("cuda"), ALL)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if _backend.triton_import_error() is not None:
        pytest.skip("triton not installed")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("refine_fwd", "triton", CPU, ALL)


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(_ext, "_LOAD_ERROR", "No module named 'tscd._C'")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' cannot run: the extension tscd._C is not available.*"
                                           r"pip install -e \."):
        resolve_backend("refine_fwd", "cpp", CPU, ALL)
    assert resolve_backend("refine_fwd", "auto", CPU, ALL) == "torch"  # auto still works


def test_extension_openmp_compiled_and_linked():
    """The extension imports (so no undefined OpenMP symbol) and was compiled with OpenMP."""
    if not _ext.has_cpp():
        if "cpp" in os.environ.get("TSCD_REQUIRE_BACKENDS", ""):
            pytest.fail(f"tscd._C is required but not built: {_ext.load_error()}")
        pytest.skip(f"tscd._C not built: {_ext.load_error()}")
    assert torch.ops.tscd.openmp_max_threads() >= 1


def _cpu_isa_child(code: str, **env: str):
    """Runs ``code`` in a fresh process (the CPU kernels read their instruction-set cap once per process) with the
    environment variables ``env`` set and TSCD_CPU_ISA / TSCD_CORRELATION_ISA unset otherwise."""
    import subprocess
    import sys

    if not _ext.has_cpp():
        pytest.skip(f"tscd._C not built: {_ext.load_error()}")
    full = {k: v for k, v in os.environ.items() if k not in ("TSCD_CPU_ISA", "TSCD_CORRELATION_ISA")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", "import torch, tscd.kernels\n" + code], env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("var", ["TSCD_CPU_ISA", "TSCD_CORRELATION_ISA"])
def test_cpu_isa_setting_checked(var):
    """A bad instruction-set cap fails the first CPU kernel call (and cpu_isa_level) with a message naming it."""
    img = "torch.rand(1, 3, 5, 6)"
    proc = _cpu_isa_child(f"tscd.kernels.refine({img}, {img}, backend='cpp')", **{var: "sse9"})
    assert proc.returncode != 0 and f"{var} must be avx512, avx2 or baseline; got 'sse9'" in proc.stderr


@pytest.mark.parametrize("env,cap", [
    (dict(TSCD_CPU_ISA="baseline"), 0), (dict(TSCD_CORRELATION_ISA="avx2"), 1),  # the older name still caps
    (dict(TSCD_CPU_ISA="avx2", TSCD_CORRELATION_ISA="baseline"), 0),  # both set: the narrower wins
    (dict(TSCD_CPU_ISA="baseline", TSCD_CORRELATION_ISA="avx512"), 0)])
def test_cpu_isa_cap(env, cap):
    proc = _cpu_isa_child("print(torch.ops.tscd.cpu_isa_level(), torch.ops.tscd.correlation_isa_level(), "
                          "torch.ops.tscd.cpu_isa_supported())", **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    level, alias, supported = map(int, proc.stdout.split())
    assert level == alias == min(cap, supported)


def test_cuda_kernels_compiled_when_required():
    """CI builds with nvcc present: the CUDA kernels must be compiled in (they cannot run without a GPU)."""
    if os.environ.get("TSCD_REQUIRE_CUDA_BUILD", "0") != "1":
        pytest.skip("set TSCD_REQUIRE_CUDA_BUILD=1 to require the CUDA kernels")
    assert _ext.has_cuda_kernels("refine_fwd"), "tscd._C was built without its CUDA kernels"


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] == torch.__version__
    assert info["extension"]["built"] == _ext.has_cpp()
    if _ext.has_cpp():
        names = list(_ext.CPU_ISA_NAMES.values())
        assert names.index(info["extension"]["cpu_isa"]) <= names.index(info["extension"]["cpu_isa_supported"])
    cpp_cpu = info["backends"]["cpp"]["cpu"]
    assert (cpp_cpu == "usable") == _ext.has_cpp()
    assert info["backends"]["torch"]["cpu"] == "usable"
    if not torch.cuda.is_available():
        assert info["backends"]["cuda"]["cuda"].startswith("no:")
    expected_auto = "cpp" if _ext.has_cpp() else "torch"
    for op in ("refine", "correlation_loss", "permutohedral (CRF loss, dense CRF)"):
        assert info["ops"][op]["cpu"]["auto"] == expected_auto
        assert "torch" in info["ops"][op]["cpu"]["usable"]
    assert "triton" not in info["ops"]["permutohedral (CRF loss, dense CRF)"]["cpu"]["supported"]


def test_info_text(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and "torch" in out and "extension" in out


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: tscd" in capsys.readouterr().out
