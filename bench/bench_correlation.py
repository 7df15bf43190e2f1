"""Benchmark of correlation_loss (SCD, docs/method.md 4.2 and 8): fused backends vs the torch reference.

Inputs as in training with a 320 crop: teacher (Ct = 20) and student (Cs = 21) maps at 1/4 resolution,
view 1 80x80, view 2 (x0.3) 24x24, batch 2. Sizes: S = 40, 80, 160 random points per side (N = S^2 per
view) and ``dense`` (every pixel: N1 = 6400, N2 = 576). Each backend's loss is checked against the
reference on the same points before timing; the reference is skipped where its N1 x N2 tensors would
need more than 8 GiB (noted in the table).

    python bench/bench_correlation.py --device cpu --backends torch,cpp --sizes 40,80,160,dense
    python bench/bench_correlation.py --device cuda --backends torch,cuda,triton --sizes 40,80,160,dense
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import environment, peak_memory, setup_threads, sync, time_fn, write_results  # noqa: E402
from tscd.kernels import correlation_loss  # noqa: E402

B, CT, CS, SIZE1, SIZE2 = 2, 20, 21, (80, 80), (24, 24)
REFERENCE_LIMIT = 8 * 2 ** 30
# The reference keeps about this many float32 N1 x N2 tensors per image alive in forward+backward
# (fd, its centred copies, cd, the clamp mask, the product and gradients); used only to decide skipping.
REFERENCE_TENSORS = 6


def _points(size: str) -> tuple[dict, int, int]:
    if size == "dense":
        return dict(dense=True), SIZE1[0] * SIZE1[1], SIZE2[0] * SIZE2[1]
    S = int(size)
    return dict(num_samples=S), S * S, S * S


def _inputs(device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    t1 = torch.rand(B, CT, *SIZE1, generator=g).to(device)
    t2 = torch.rand(B, CT, *SIZE2, generator=g).to(device)
    s1 = torch.randn(B, CS, *SIZE1, generator=g).to(device).requires_grad_()
    s2 = torch.randn(B, CS, *SIZE2, generator=g).to(device).requires_grad_()
    return t1, t2, s1, s2


MODES = ("fwd", "fwd_grad", "fwd_bwd")


def _call(maps, kw: dict, backend: str, mode: str):
    """fwd: the loss alone (no_grad: evaluation, logging); fwd_grad: the forward of a training step (autograd on,
    the cpp backend then computes the gradients in this sweep); fwd_bwd: forward and backward of a training step."""
    def fn():
        t1, t2, s1, s2 = maps
        s1.grad = s2.grad = None
        with torch.set_grad_enabled(mode != "fwd"):
            loss = correlation_loss(t1, t2, s1, s2, generator=torch.Generator().manual_seed(1), backend=backend, **kw)
        if mode == "fwd_bwd":
            loss.backward()
        return loss

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backends", default="torch,cpp")
    ap.add_argument("--sizes", default="40,80,160,dense")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    setup_threads(device, args.threads)
    env = environment(device, args.threads)
    maps = _inputs(device)
    backends = args.backends.split(",")
    rows = []
    for size in args.sizes.split(","):
        kw, n1, n2 = _points(size)
        ref_bytes = REFERENCE_TENSORS * B * n1 * n2 * 4
        ref_loss = None
        if "torch" in backends and ref_bytes <= REFERENCE_LIMIT:
            with torch.no_grad():
                ref_loss = _call(maps, kw, "torch", "fwd")().item()
        for backend in backends:
            if backend == "torch" and ref_bytes > REFERENCE_LIMIT:
                for mode in args.modes.split(","):
                    rows.append(dict(size=size, N1=n1, N2=n2, backend=backend, mode=mode,
                                     note=f"skipped: needs ~{ref_bytes / 2 ** 30:.0f} GiB (> 8 GiB)"))
                print(f"{size} torch: skipped (~{ref_bytes / 2 ** 30:.0f} GiB)", flush=True)
                continue
            with torch.no_grad():
                loss = _call(maps, kw, backend, "fwd")().item()
            if ref_loss is not None:
                rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
                if rel > 1e-3:
                    raise SystemExit(f"{backend} at {size}: loss {loss} differs from the reference {ref_loss}")
                check = f"ok (rel. diff {rel:.1e})"
            else:
                check = "reference skipped"
            for mode in args.modes.split(","):
                fn = _call(maps, kw, backend, mode)
                t = time_fn(fn, device, threads=args.threads, min_run_time=args.min_run_time)
                sync(device)
                mem = peak_memory(fn, device)
                rows.append(dict(size=size, N1=n1, N2=n2, backend=backend, mode=mode, ms=t["ms"], ms_p20=t["ms_p20"],
                                 ms_p80=t["ms_p80"], peak_mib=mem / 2 ** 20, loss=loss, check=check))
                print(f"{size} {backend} {mode}: {t['ms']:.1f} ms, {mem / 2 ** 20:.1f} MiB, {check}", flush=True)
    base = {(r["size"], r["mode"]): r for r in rows if r["backend"] == "torch" and "ms" in r}
    fwd = {(r["size"], r["backend"]): r["ms"] for r in rows if r["mode"] == "fwd" and "ms" in r}
    for r in rows:
        if r["mode"] == "fwd_bwd" and "ms" in r and (r["size"], r["backend"]) in fwd:
            r["vs_fwd"] = r["ms"] / fwd[(r["size"], r["backend"])]
            print(f"{r['size']} {r['backend']}: fwd_bwd / fwd = {r['vs_fwd']:.2f}", flush=True)
    for r in rows:
        b = base.get((r["size"], r["mode"]))
        if b is not None and "ms" in r and r["backend"] != "torch":
            r["speedup"] = b["ms"] / r["ms"]
            r["mem_ratio"] = b["peak_mib"] / max(r["peak_mib"], 1e-9)
    columns = [("size", "S"), ("N1", "N1"), ("N2", "N2"), ("backend", "backend"), ("mode", "mode"),
               ("ms", "median ms"), ("ms_p20", "p20"), ("ms_p80", "p80"), ("peak_mib", "peak MiB"),
               ("vs_fwd", "fwd_bwd / fwd"), ("speedup", "speed-up vs torch"), ("mem_ratio", "memory ratio vs torch"),
               ("check", "vs reference"),
               ("note", "note")]
    notes = (f"Batch {B}, teacher Ct={CT}, student Cs={CS}, view 1 {SIZE1[0]}x{SIZE1[1]}, view 2 {SIZE2[0]}x{SIZE2[1]} "
             "(1/4 resolution of a 320 crop, view 2 at x0.3). S: random S x S points per view; dense: every pixel. "
             "Time and peak memory cover the sampling, normalisation and the loss. Modes: fwd = the loss alone "
             "(under no_grad: evaluation, logging); fwd_grad = the forward of a training step (autograd on: the "
             "cpp backend computes the gradients in the same sweep over the point pairs, so its fwd_grad "
             "carries nearly all of the backward's work); fwd_bwd = forward and backward to the student maps. "
             "CPU peak memory: torch CPU allocator, replayed from the profiler's memory events (tensor bytes, not "
             "RSS). fwd_bwd / fwd: a training step's time over the loss alone (same backend and size).")
    paths = write_results("correlation", env, rows, columns, out_dir=args.out, notes=notes)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
