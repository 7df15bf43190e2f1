"""`tscd info`: versions, and which kernel backends are built and usable on this machine."""
from __future__ import annotations

import argparse
import json
import platform


def collect() -> dict:
    import torch

    import tscd
    from tscd.kernels import _backend, _ext

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    import importlib

    # the modules, not the public functions of the same names that tscd.kernels exports
    refine, correlation, permutohedral = (importlib.import_module(f"tscd.kernels.{m}")
                                          for m in ("refine", "correlation", "permutohedral"))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    ops = {"refine": ("refine_fwd", refine.SUPPORTED_BACKENDS),
           "correlation_loss": ("correlation_fwd", correlation.SUPPORTED_BACKENDS),
           "permutohedral (CRF loss, dense CRF)": ("permutohedral_fwd", permutohedral.SUPPORTED_BACKENDS)}
    backends = {}
    for name in _backend.ALL_KERNEL_BACKENDS:
        per_device = {}
        for dev in (cpu, gpu):
            if dev.type == "cuda" and not torch.cuda.is_available():
                why = "no CUDA GPU visible"
            else:
                why = _backend.why_unavailable(name, dev, "refine_fwd")
            per_device[dev.type] = "usable" if why is None else f"no: {why}"
        backends[name] = per_device
    per_op = {}
    for op, (schema, supported) in ops.items():
        per_op[op] = {dev.type: {"supported": list(supported),
                                 "usable": [] if dev.type == "cuda" and not torch.cuda.is_available()
                                 else _backend.available_backends(schema, dev, supported),
                                 "auto": None if dev.type == "cuda" and not torch.cuda.is_available()
                                 else _backend.resolve_backend(schema, "auto", dev, supported)}
                      for dev in (cpu, gpu)}
        if _ext.has_cpp():
            per_op[op]["cuda_kernels_compiled"] = _ext.has_cuda_kernels(schema)
    return {
        "tscd": tscd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "extension": {"built": _ext.has_cpp(), "error": _ext.load_error(), **_ext.build_info(),
                      "build_report": _ext.build_report()},
        "triton_interpret": _backend.triton_interpret(),
        "backends": backends,
        "ops": per_op,
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ext = info["extension"]
    lines = [
        f"tscd        {info['tscd']}",
        f"python      {info['python']}",
        f"torch       {info['torch']} (CUDA build: {info['torch_cuda'] or 'no'})",
        f"triton      {info['triton'] or 'not installed'}"
        + ("  [TRITON_INTERPRET=1]" if info["triton_interpret"] else ""),
        f"GPU         {info['gpu'] or 'none visible'}",
        f"threads     {info['torch_threads']}",
        "extension   " + ("tscd._C built; OpenMP threads {}; CPU kernels {} (this CPU: {}); CUDA kernels compiled: {}"
                            .format(ext.get("openmp_threads"), ext.get("cpu_isa"), ext.get("cpu_isa_supported"),
                                    "yes" if ext.get("cuda_kernels") else "no")
            if ext["built"]
            else f"NOT built: {ext['error']}"),
        *(f"  build     {line}" for line in (ext["build_report"] or {}).get("summary", [])
          if not line.startswith("`tscd info`")),
        "",
        "backends (`auto` = cuda, else triton for CUDA tensors; cpp for CPU tensors; torch last):",
    ]
    for name, per in info["backends"].items():
        lines.append(f"  {name:<7} cpu tensors:  {per['cpu']}")
        lines.append(f"  {'':<7} cuda tensors: {per['cuda']}")
    lines += ["", "ops (backends usable here; `auto` picks the first):"]
    for op, per in info["ops"].items():
        cpu = per["cpu"]
        compiled = per.get("cuda_kernels_compiled")
        lines.append(f"  {op:<36} cpu: auto={cpu['auto']}, usable {', '.join(cpu['usable'])}; "
                     f"implements {', '.join(cpu['supported'])}"
                     + ("" if compiled is None else f"; CUDA kernels compiled: {'yes' if compiled else 'no'}"))
    print("\n".join(lines))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="versions and the kernel backends usable here")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)
