"""Benchmark refine (VARM): every available backend vs the torch reference (docs/method.md 8).

Sizes: H = W in {160, 256}, K in {2, 3, 21}, four refinements batched into one call (B = 4), as the
pseudo labels need them (2 images x 2 background thresholds). Modes: ``fwd`` and ``fwd_bwd``
(gradient w.r.t. the maps). Each backend is checked against the reference before it is timed.

    python bench/bench_refine.py --device cpu --threads 2
    python bench/bench_refine.py --device cuda --backends torch,cuda,triton
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._common import environment, peak_memory, setup_threads, time_fn, write_results  # noqa: E402
from tscd.kernels import available_backends, refine  # noqa: E402
from tscd.kernels.refine import SUPPORTED_BACKENDS  # noqa: E402

logger = logging.getLogger("bench_refine")


def run_case(backend: str, img: torch.Tensor, cam: torch.Tensor, mode: str):
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return refine(img, cam, backend=backend)
    else:
        cam_g = cam.detach().requires_grad_()

        def fn():
            out = refine(img, cam_g, backend=backend)
            out.sum().backward()
            cam_g.grad = None
            return out
    return fn


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", default=None, help="comma list (default: every available backend)")
    p.add_argument("--sizes", default="160,256")
    p.add_argument("--channels", default="2,3,21")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=1.0, help="CPU: seconds of timing per case")
    p.add_argument("--out", default=None, help="output folder (default bench/results)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    setup_threads(device, args.threads)
    backends = args.backends.split(",") if args.backends else available_backends("refine_fwd", device,
                                                                                 SUPPORTED_BACKENDS)
    if "triton" in backends and device.type == "cpu":
        backends.remove("triton")  # the CPU interpreter is a test tool, not a backend to time
    backends = ["torch"] + [b for b in backends if b != "torch"]  # the baseline first
    env = environment(device, args.threads)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for K in [int(k) for k in args.channels.split(",")]:
            g = torch.Generator().manual_seed(0)
            img = torch.rand(args.batch, 3, size, size, generator=g).to(device)
            cam = torch.rand(args.batch, K, size // 4, size // 4, generator=g).to(device)
            ref = refine(img, cam, backend="torch")
            for mode in args.modes.split(","):
                base = None
                for backend in backends:
                    out = refine(img, cam, backend=backend)
                    err = (out - ref).abs().max().item()
                    if err > 1e-3 * max(1.0, ref.abs().max().item()):
                        raise SystemExit(f"{backend} disagrees with the reference at {size}^2 K={K}: max err {err}")
                    fn = run_case(backend, img, cam, mode)
                    mem = peak_memory(fn, device)  # also the warm-up run
                    t = time_fn(fn, device, threads=args.threads, min_run_time=args.min_run_time, warmup=False)
                    row = {"size": f"{size}x{size}", "K": K, "B": args.batch, "mode": mode, "backend": backend,
                           **t, "peak_mib": mem / 2**20, "max_err": err}
                    if backend == "torch":
                        base = row
                    row["speedup"] = base["ms"] / row["ms"] if base else 1.0
                    row["mem_ratio"] = base["peak_mib"] / max(row["peak_mib"], 1e-9) if base else 1.0
                    rows.append(row)
                    logger.info("%s K=%d %-7s %-6s %9.2f ms  %9.1f MiB  x%.1f faster  x%.1f less memory",
                                row["size"], K, mode, backend, row["ms"], row["peak_mib"], row["speedup"],
                                row["mem_ratio"])
    columns = [("size", "H x W"), ("K", "K"), ("B", "B"), ("mode", "mode"), ("backend", "backend"),
               ("ms", "median ms"), ("ms_p20", "p20"), ("ms_p80", "p80"), ("peak_mib", "peak MiB"),
               ("speedup", "speed-up vs torch"), ("mem_ratio", "memory ratio (torch / this)"),
               ("max_err", "max abs err vs torch")]
    notes = ("refine, mode varm, 6 dilations, 10 iterations, maps at 1/4 resolution resized inside. "
             "fwd_bwd: the gradient w.r.t. the maps (the fused backends recompute the weights, then run the "
             "transposed steps). CPU peak memory: highest live bytes of torch's CPU allocator during one call "
             "(profiler events).")
    paths = write_results("refine", env, rows, columns, args.out, notes=notes)
    logger.info("wrote %s and %s", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
