"""Compile every Triton kernel of tscd offline, for real GPU targets, with no GPU.

The CPU tests run the kernels in the interpreter (``TRITON_INTERPRET=1``), which accepts code the real
compiler refuses (plain globals inside ``@triton.jit``) and knows nothing of shared memory or
registers. This module compiles each kernel with ``triton.compile`` of an ``ASTSource`` for
``GPUTarget("cuda", 80 | 90, 32)`` (triton ships ``ptxas``), at the launch configurations our launchers
pick for the shape families we use (VOC and COCO channel counts, and the 64 / 256 widths of the tile table;
float32 and float64 where used: every kernel computes in float32 or float64, half inputs are upcast), and
reports shared memory against the target's per-block limit, registers and spills (stack bytes).

    python -m tscd.kernels._triton.compile_check                 # sm_80 and sm_90, a table
    python -m tscd.kernels._triton.compile_check --archs 90 --json out.json

It must run with ``TRITON_INTERPRET`` unset (the flag is read when a kernel is decorated, at import);
the test (tests/kernels/test_triton_compile.py) runs it in a subprocess for that reason. Exit status 1
when a kernel fails to compile or exceeds the shared-memory limit.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

#: max dynamic shared memory per block (opt-in), bytes: A100 (sm_80), H100/H200 (sm_90)
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
#: channel counts of the datasets: (student Cs, teacher Ct) = (classes + background, classes)
CHANNEL_FAMILIES = {"voc": (21, 20), "coco": (81, 80)}
#: other padded widths the tile heuristic covers (custom datasets): 64 and 256 channels
EXTRA_CHANNEL_FAMILIES = {"c64": (41, 40), "c256": (151, 150)}
_TORCH_TO_TRITON = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16",
                    "int32": "i32", "int64": "i64"}


@dataclass
class Case:
    """One kernel at one launch configuration."""
    kernel: str
    family: str
    fn: object = field(repr=False)
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 3


@dataclass
class Result:
    kernel: str
    family: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool
    shared: int | None = None
    shared_limit: int | None = None
    registers: int | None = None
    stack: int | None = None  # bytes per thread: register spills
    seconds: float = 0.0
    error: str | None = None


def _ptr(dtype: str) -> str:
    return "*" + _TORCH_TO_TRITON[dtype]


def refine_cases() -> list[Case]:
    """The three refine kernels at the launcher's tile (BLOCK pixels, NUM_WARPS), float32 and float64."""
    import triton.language as tl

    from tscd.kernels._triton import refine as r

    cases = []
    for dt in ("float32", "float64"):
        for varm in (True, False):
            sig = {"img_ptr": _ptr(dt), "w_ptr": "*fp32", "sy_ptr": "*i32", "sx_ptr": "*i32",
                   "prior_ptr": "*i32" if varm else _ptr(dt), "H": "i32", "W": "i32", "N_NB": "i32",
                   "rgb_scale": "fp32", "aux_weight": "fp32", "IS_VARM": "constexpr", "BLOCK_P": "constexpr"}
            cases.append(Case("refine_weights", f"{'varm' if varm else 'par'}-{dt}", r._refine_weights_kernel, sig,
                              {"IS_VARM": varm, "BLOCK_P": r.BLOCK}, r.NUM_WARPS))
        for has_nc in (True, False):
            base = {"src_ptr": _ptr(dt), "dst_ptr": _ptr(dt), "w_ptr": _ptr(dt), "nc_ptr": "*i64" if has_nc else "*i32",
                    "sy_ptr": "*i32", "sx_ptr": "*i32", "H": "i32", "W": "i32", "K": "i32", "N_NB": "i32",
                    "HAS_NC": "constexpr"}
            fam = f"{dt}{'-num_channels' if has_nc else ''}"
            acc = tl.float64 if dt == "float64" else tl.float32
            cases.append(Case("refine_step", fam, r._refine_step_kernel,
                              {**base, "ACC_DTYPE": "constexpr", "BLOCK_P": "constexpr"},
                              {"HAS_NC": has_nc, "ACC_DTYPE": acc, "BLOCK_P": r.BLOCK}, r.NUM_WARPS))
            cases.append(Case("refine_step_transpose", fam, r._refine_step_transpose_kernel,
                              {**base, "BLOCK_P": "constexpr"}, {"HAS_NC": has_nc, "BLOCK_P": r.BLOCK}, r.NUM_WARPS))
    return cases


def correlation_cases(n_points: int = 1600, families: dict | None = None) -> list[Case]:
    """The correlation kernel's three passes (forward, row, column), for VOC and COCO channel counts, at the
    launcher's GPU tiles (``_gpu_config``); ``n_points`` (40 x 40 by default) does not change the code."""
    from tscd.kernels._triton import correlation as c

    ptrs = ["out_s_ptr", "out_t_ptr", "in_s_ptr", "in_t_ptr", "off_ptr", "grad_ptr", "loss_ptr", "ds_ptr", "dt_ptr",
            "dc_ptr"]
    consts = ["CLAMP", "OFFSET_INNER", "BACKWARD", "WITH_T", "WITH_C", "BLOCK_O", "BLOCK_I", "CS_P", "CT_P",
              "PRECISION"]
    sig = {**{p: "*fp32" for p in ptrs}, **{n: "i32" for n in ("N_OUT", "N_IN", "CS", "CT")},
           **{k: "constexpr" for k in consts}}
    passes = {  # name: (offset_inner, backward, with_t, with_c)
        "forward": (False, False, False, False),
        "row": (False, True, False, False),
        "row+teacher": (False, True, True, True),
        "column": (True, True, False, False),
        "column+teacher": (True, True, True, False),
    }
    cases = []
    if families is None:
        families = {**CHANNEL_FAMILIES, **EXTRA_CHANNEL_FAMILIES}
    for fam, (cs, ct) in families.items():
        cs_p, ct_p = c._padded(cs), c._padded(ct)
        for name, (inner, bwd, wt, wc) in passes.items():
            if wt and fam not in CHANNEL_FAMILIES:  # the teacher-gradient passes: for the datasets' widths only
                continue
            cfg = c._gpu_config(n_points, n_points, cs_p, ct_p, backward=bwd, with_t=wt)
            cases.append(Case(f"correlation:{name}", f"{fam} Cs={cs} Ct={ct}", c._correlation_pass_kernel, sig,
                              {"CLAMP": True, "OFFSET_INNER": inner, "BACKWARD": bwd, "WITH_T": wt, "WITH_C": wc,
                               "BLOCK_O": cfg.block_o, "BLOCK_I": cfg.block_i, "CS_P": cs_p, "CT_P": ct_p,
                               "PRECISION": cfg.precision}, cfg.num_warps, cfg.num_stages))
    return cases


def all_cases() -> list[Case]:
    return refine_cases() + correlation_cases()


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of the compiled kernel, from ``cuobjdump --dump-resource-usage`` of the cubin.

    The stack holds register spills (and local arrays, which our kernels do not have): 0 means no spills.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True)
    regs = re.search(r"REG:(\d+)", out.stdout)
    stack = re.search(r"STACK:(\d+)", out.stdout)
    return (int(regs.group(1)) if regs else None, int(stack.group(1)) if stack else None)


def compile_case(case: Case, arch: int) -> Result:
    """Compile one case for ``sm_<arch>``; never raises (the error goes into the result)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(case.kernel, case.family, arch, case.num_warps, case.num_stages, ok=False,
                 shared_limit=SHARED_LIMIT.get(arch))
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": case.num_warps, "num_stages": case.num_stages})
        res.shared = int(kernel.metadata.shared)
        res.registers, res.stack = _resource_usage(kernel.asm["cubin"])
        res.ok = res.shared_limit is None or res.shared <= res.shared_limit
        if not res.ok:
            res.error = f"needs {res.shared} B of shared memory, the sm_{arch} limit is {res.shared_limit} B"
    except Exception as exc:  # the compiler's own message is the useful part: its first and last lines (a
        # CompilationError starts with the source position and ends with the cause)
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        msg = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
        res.error = f"{type(exc).__name__}: {msg[:500]}"
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def _selected(kernels: str | None) -> list[Case]:
    cases = all_cases()
    return [c for c in cases if re.search(kernels, c.kernel)] if kernels else cases


def _compile_job(job: tuple[int, int, str | None]) -> Result:
    index, arch, kernels = job
    return compile_case(_selected(kernels)[index], arch)


def run(archs: list[int], kernels: str | None = None, jobs: int = 1) -> list[Result]:
    """Compile the selected cases for every arch; ``jobs`` > 1 compiles in that many processes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check must run with TRITON_INTERPRET unset: the kernels are decorated at import, "
                           "and interpreted kernels cannot be compiled")
    work = [(i, a, kernels) for a in archs for i in range(len(_selected(kernels)))]
    if jobs <= 1:
        return [_compile_job(w) for w in work]
    import multiprocessing as mp

    with mp.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_job, work, chunksize=1)


def format_table(results: list[Result]) -> str:
    lines = [f"{'kernel':24} {'family':26} {'arch':>5} {'warps':>5} {'stages':>6} {'shared B':>9} {'limit':>7} "
             f"{'regs':>5} {'stack B':>8} {'s':>5}  status"]
    for r in results:
        lines.append(f"{r.kernel:24} {r.family:26} {'sm_' + str(r.arch):>5} {r.num_warps:>5} {r.num_stages:>6} "
                     f"{r.shared if r.shared is not None else '-':>9} {r.shared_limit or '-':>7} "
                     f"{r.registers if r.registers is not None else '-':>5} "
                     f"{r.stack if r.stack is not None else '-':>8} "
                     f"{r.seconds:>5}  "
                     f"{'ok' if r.ok else 'FAIL: ' + (r.error or '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="80,90", help="compute capabilities x10, comma separated (default 80,90)")
    p.add_argument("--kernels", default=None, help="regular expression on the kernel names (default: all)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiler processes (default 2)")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",") if a.strip()]
    import triton

    results = run(archs, args.kernels, args.jobs)
    print(f"triton {triton.__version__}; {len(results)} compilations")
    print(format_table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "results": [asdict(r) for r in results]}, f, indent=1)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
