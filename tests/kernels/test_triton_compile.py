"""Every Triton kernel compiled by the real compiler for sm_80 and sm_90, on the CPU (no GPU needed).

The rest of the suite runs the kernels in the interpreter (TRITON_INTERPRET=1, set by conftest.py), which hid
two bugs that break every GPU run: a plain global read inside @triton.jit (refine) and a tile configuration that
needs more shared memory than any GPU has (correlation at COCO's channel counts). Kernels are decorated at
import, and this process imported them interpreted, so the compilation runs in a subprocess with
TRITON_INTERPRET unset (tscd/kernels/_triton/compile_check.py). Registers and spills are printed (-s / -rA).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REQUIRED

ROOT = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
MARGIN = 0.9  # shared memory must stay under 90 % of the target's limit


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_CACHE_DIR", str(tmp / "triton-cache"))
    return env


def _has_compiler() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton with its NVIDIA backend is not importable: {exc}"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    why = _has_compiler()
    if why is not None:
        if "triton" in REQUIRED:
            pytest.fail(why)
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("triton_compile")
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, "-m", "tscd.kernels._triton.compile_check", "--archs",
                           ",".join(map(str, ARCHS)), "--json", str(out)], cwd=ROOT, env=_env(tmp),
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-20000:], proc.stderr[-3000:])
    assert out.is_file(), f"compile_check did not finish:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


def test_every_kernel_compiles_for_sm80_and_sm90(compiled):
    proc, data = compiled
    results = data["results"]
    failed = [f"{r['kernel']} [{r['family']}] sm_{r['arch']}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0
    kernels = {r["kernel"] for r in results}
    assert {"refine_weights", "refine_step", "refine_step_transpose"} <= kernels
    assert {"correlation:forward", "correlation:row", "correlation:column"} <= kernels
    for arch in ARCHS:  # both targets, both channel families, float32 and float64 refine
        got = {(r["kernel"], r["family"]) for r in results if r["arch"] == arch}
        assert any("coco" in fam for _, fam in got) and any("voc" in fam for _, fam in got)
        assert any("float64" in fam for _, fam in got) and any("float32" in fam for _, fam in got)


def test_shared_memory_fits_the_targets_with_margin(compiled):
    _, data = compiled
    for r in data["results"]:
        assert r["shared"] is not None and r["shared_limit"] is not None, r
        assert r["shared"] <= MARGIN * r["shared_limit"], (
            f"{r['kernel']} [{r['family']}] sm_{r['arch']}: {r['shared']} B of shared memory, more than "
            f"{MARGIN:.0%} of the {r['shared_limit']} B limit")
        assert r["registers"] is not None and r["registers"] <= 255, r


def test_the_check_catches_interpreter_only_code(tmp_path):
    """A kernel reading a plain (non-constexpr) global runs in the interpreter but must fail here, as refine's
    STD_EPS did; the same kernel with a tl.constexpr global compiles."""
    if _has_compiler() is not None:
        pytest.skip(_has_compiler())
    src = tmp_path / "probe_kernels.py"
    src.write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        EPS = 1e-8
        EPS_C = tl.constexpr(1e-8)

        @triton.jit
        def plain_global(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + EPS)

        @triton.jit
        def constexpr_global(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + EPS_C)
    """))
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import probe_kernels as k
        from tscd.kernels._triton.compile_check import Case, compile_case
        out = {{}}
        for name in ("plain_global", "constexpr_global"):
            sig = {{"x_ptr": "*fp32", "BLOCK": "constexpr"}}
            case = Case(name, "probe", getattr(k, name), sig, {{"BLOCK": 128}}, 4)
            r = compile_case(case, 90)
            out[name] = [r.ok, r.error]
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["plain_global"][0] is False and "global" in res["plain_global"][1].lower(), res
    assert res["constexpr_global"] == [True, None], res


def test_compile_check_refuses_the_interpreter():
    proc = subprocess.run([sys.executable, "-m", "tscd.kernels._triton.compile_check", "--kernels", "refine_step$"],
                          cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "TRITON_INTERPRET unset" in proc.stderr


def test_correlation_tiles_by_channel_width():
    """Wider channels get smaller tiles / fewer stages (what keeps COCO inside shared memory); beyond the widest
    configuration the triton backend refuses with a clear message instead of failing at launch."""
    from tscd.kernels._triton import correlation as c

    voc = c._gpu_config(1600, 1600, c._padded(21), c._padded(20), backward=True, with_t=False)
    coco = c._gpu_config(1600, 1600, c._padded(81), c._padded(80), backward=True, with_t=False)
    assert (voc.block_o * voc.block_i * voc.num_stages) > (coco.block_o * coco.block_i * coco.num_stages)
    assert coco.num_stages <= 2 and coco.precision == voc.precision == "tf32x3"
    with pytest.raises(ValueError, match="at most 256 channels"):
        c._gpu_config(16, 16, 512, 16, backward=False, with_t=False)


def test_device_guard_selects_the_tensors_gpu():
    """Triton launches on the current device; the launchers enter the inputs' device first (a no-op on the CPU)."""
    import contextlib

    import torch

    from tscd.kernels._triton._launch import device_guard

    assert isinstance(device_guard(torch.zeros(1)), contextlib.nullcontext)

    class FakeCuda:  # a CUDA tensor's device without a GPU: torch.cuda.device only records the index until entered
        device = torch.device("cuda", 1)

    guard = device_guard(FakeCuda())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
