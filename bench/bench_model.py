"""Benchmark the TSCD model: training forward+backward, and multi-scale CAMs (fast path vs reference path).

Cases, per crop size (batch ``--batch``, model ``--model``, default MiT-B1):

* ``train_fwd_bwd``: ``TSCDNet.forward`` (encoder with the last two stage-4 attention maps, classifier, decoder,
  affinity head) + backward of a scalar that touches every output, model in train mode. On CUDA once in fp32 and
  once under bf16 autocast (``--dtypes``).
* ``cam_fast``: :func:`tscd.models.multi_scale_cam`, scales (1, 0.5, 1.5) with flip: one encoder+classifier call
  per scale with image and flip batched.
* ``cam_reference``: :func:`tscd.models.multi_scale_cam_reference`: the full training forward (decoder and
  affinity head included) per scale, for the image and the flip separately, as the official code does.

The two CAM paths are checked against each other (eval mode) before timing; CAM timings use eval mode (the cost
does not depend on the mode). Time: median and 20/80 % quantiles (ms) from ``bench/_common.time_fn``; peak memory:
``bench/_common.peak_memory`` (CPU: peak of live tensor bytes from the profiler's allocator events, not RSS).

    python bench/bench_model.py --device cpu --sizes 320,512 --out bench/results
    python bench/bench_model.py --device cuda --sizes 320,512 --dtypes fp32,bf16 --out bench/results
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import environment, peak_memory, setup_threads, time_fn, write_results  # noqa: E402
from tscd.models import create_model, multi_scale_cam, multi_scale_cam_reference  # noqa: E402

logger = logging.getLogger("bench.model")

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = [("case", "case"), ("size", "crop"), ("batch", "batch"), ("dtype", "dtype"), ("ms", "median ms"),
           ("ms_p20", "p20 ms"), ("ms_p80", "p80 ms"), ("peak_mib", "peak MiB"), ("speedup", "speed-up vs ref"),
           ("mem_ratio", "memory ref/this")]
CAM_SCALES = (1.0, 0.5, 1.5)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def bench_train(model: torch.nn.Module, img: torch.Tensor, dtype_name: str, args: argparse.Namespace) -> dict:
    model.train()
    device = img.device

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(device, DTYPES[dtype_name]):
            out = model(img)
            loss = (out.cls_logits.float().sum() + out.seg_logits.float().mean() + out.affinity.float().mean()
                    + out.cam.float().mean())
        loss.backward()

    row = time_fn(step, device, threads=args.threads, min_run_time=args.min_run_time)
    row["peak_mib"] = peak_memory(step, device) / 2**20
    return row


def bench_cam(model: torch.nn.Module, img: torch.Tensor, dtype_name: str, args: argparse.Namespace
              ) -> tuple[dict, dict]:
    model.eval()
    device = img.device
    dtype = DTYPES[dtype_name]

    def fast() -> torch.Tensor:
        with _autocast(device, dtype):
            return multi_scale_cam(model, img, CAM_SCALES)

    def ref() -> torch.Tensor:
        with _autocast(device, dtype):
            return multi_scale_cam_reference(model, img, CAM_SCALES)

    err = (fast().float() - ref().float()).abs().max().item()
    tol = 1e-4 if dtype is None else 5e-2
    if err > tol:
        raise RuntimeError(f"bench_model: multi_scale_cam differs from the reference by {err:.3e} (> {tol})")
    rows = []
    for fn in (fast, ref):
        row = time_fn(fn, device, threads=args.threads, min_run_time=args.min_run_time)
        row["peak_mib"] = peak_memory(fn, device) / 2**20
        row["max_abs_diff_vs_ref"] = err
        rows.append(row)
    return rows[0], rows[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default="320,512", help="comma-separated square crop sizes")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--model", default="tscd_mit_b1")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--dtypes", default=None, help="fp32,bf16,fp16 (autocast); default fp32 on cpu, "
                                                       "fp32,bf16 on cuda")
    parser.add_argument("--cases", default="train,cam", help="train and/or cam")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="CPU Timer min_run_time (s)")
    parser.add_argument("--out", default=None, help="result folder (default bench/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU visible")
    setup_threads(device, args.threads)
    dtype_names = (args.dtypes or ("fp32" if device.type == "cpu" else "fp32,bf16")).split(",")
    unknown = [d for d in dtype_names if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    cases = args.cases.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]

    load_start = os.getloadavg()
    torch.manual_seed(0)
    logging.getLogger("tscd.models.mit").setLevel(logging.ERROR)  # random init is fine for timing
    model = create_model(args.model, num_classes=args.num_classes).to(device)
    rows: list[dict] = []
    for size in sizes:
        img = torch.randn(args.batch, 3, size, size, device=device)
        for dtype_name in dtype_names:
            base = {"size": size, "batch": args.batch, "dtype": dtype_name, "model": args.model}
            if "train" in cases:
                logger.info("train_fwd_bwd size %d %s", size, dtype_name)
                rows.append({"case": "train_fwd_bwd", **base, **bench_train(model, img, dtype_name, args)})
                logger.info("  %.1f ms, peak %.0f MiB", rows[-1]["ms"], rows[-1]["peak_mib"])
            if "cam" in cases:
                logger.info("multi_scale_cam size %d %s", size, dtype_name)
                fast, ref = bench_cam(model, img, dtype_name, args)
                fast.update(speedup=ref["ms"] / fast["ms"], mem_ratio=ref["peak_mib"] / max(fast["peak_mib"], 1e-9))
                rows.append({"case": "cam_fast", **base, **fast})
                rows.append({"case": "cam_reference", **base, **ref})
                logger.info("  fast %.1f ms (%.0f MiB), reference %.1f ms (%.0f MiB)", fast["ms"], fast["peak_mib"],
                            ref["ms"], ref["peak_mib"])
    env = environment(device, args.threads)
    notes = (f"Model {args.model} (random init), batch {args.batch}. train_fwd_bwd: TSCDNet.forward + backward in "
             f"train mode. cam_*: scales {CAM_SCALES} + flip, eval mode, no grad; cam_fast = multi_scale_cam "
             f"(encoder + classifier, image and flip batched), cam_reference = full training forward per scale, image "
             f"and flip separately (the official code's cost). Peak memory on CPU: peak live tensor bytes from the "
             f"profiler's allocator events (not RSS).")
    if device.type == "cpu":
        notes += (f" 1-min load average at start {load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} (the CPU is "
                  f"shared: timings are indicative).")
    json_path, md_path = write_results("model", env, rows, COLUMNS, out_dir=args.out, notes=notes)
    logger.info("wrote %s and %s", json_path, md_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
