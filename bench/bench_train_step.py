"""Benchmark one whole TSCD training iteration (all losses on): reference-style path vs our fast path.

Reference-style = what the official code does: CAM passes through the full model (decoder and affinity
head included) per scale and flip, one VARM call per image and threshold, pure-PyTorch ops, CRF loss
copied to the host. Fast = multi-scale CAMs through the encoder only, one batched VARM call, fused
kernels (backend auto). Both start from the same weights and see the same batches; the losses of the
first timed iteration are compared before timing (drop-path off, so CAMs are deterministic).

    python bench/bench_train_step.py --device cpu --crop 160 --model tscd_mit_b1 --iters 3
    python bench/bench_train_step.py --device cuda --crop 512 --model tscd_mit_b1 --iters 20
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._common import environment, setup_threads, sync, write_results  # noqa: E402
from tscd.config import load_config  # noqa: E402
from tscd.train import Trainer  # noqa: E402

logger = logging.getLogger("bench_train_step")


def make_trainer(args, reference_style: bool, run_dir: str) -> Trainer:
    overrides = [
        "data.dataset=demo", "data.train_split=train", "data.val_split=val",
        f"data.crop_size={args.crop}", f"data.demo_size={args.crop}",
        f"data.batch_size={args.batch}", "data.num_workers=0", f"data.demo_num_train={args.batch * (args.iters + 2)}",
        "data.demo_num_val=1", "data.scale_range=[1.0, 1.0]",
        f"model.name={args.model}", "model.drop_path_rate=0.0",
        f"train.device={args.device}", f"train.max_iters={10**6}", "train.cam_iters=0", "train.tensorboard=false",
        f"train.reference_style={str(reference_style).lower()}", f"train.run_dir={run_dir}",
        f"train.amp={args.amp}",
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, resume="never")
    for m in trainer.net.modules():  # the reference-style CAM passes run the decoder's dropout, which would
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):  # shift the RNG stream: off, to compare losses
            m.p = 0.0
    return trainer


def run(trainer: Trainer, batches: list[dict], device: torch.device) -> tuple[list[float], list[dict]]:
    times, losses = [], []
    for batch in batches:
        sync(device)
        t0 = time.perf_counter()
        trainer.iteration += 1
        losses.append(trainer.train_step(batch))
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--crop", type=int, default=160)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--model", default="tscd_mit_b1")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", default="off", choices=["off", "bf16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    setup_threads(device, args.threads)
    env = environment(device, args.threads)
    fast = make_trainer(args, False, "/tmp/tscd_bench_fast")
    ref = make_trainer(args, True, "/tmp/tscd_bench_ref")
    ref.net.load_state_dict(copy.deepcopy(fast.net.state_dict()))
    ref.optimizer.load_state_dict(fast.optimizer.state_dict())
    it = iter(fast.train_loader)
    batches = [next(it) for _ in range(args.iters + 1)]
    rows = []
    results = {}
    for name, trainer in (("reference-style", ref), ("fast", fast)):
        torch.manual_seed(0)
        trainer.scd_gen.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = run(trainer, batches, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        results[name] = (times[1:], losses)
        rows.append({"path": name, "crop": args.crop, "batch": args.batch, "model": args.model, "amp": args.amp,
                     "s_per_it": statistics.median(times[1:]), "peak_mib": peak,
                     "loss_first": losses[0]["total"]})
        logger.info("%-16s %.3f s/it (median of %d), peak %.0f MiB, losses of iteration 1: %s", name,
                    rows[-1]["s_per_it"], len(times) - 1, peak,
                    {k: round(v, 5) for k, v in losses[0].items()})
    diff = {k: abs(results["fast"][1][0][k] - results["reference-style"][1][0][k]) for k in results["fast"][1][0]}
    logger.info("first-iteration loss differences (fast vs reference-style): %s", diff)
    base = rows[0]
    for row in rows:
        row["speedup"] = base["s_per_it"] / row["s_per_it"]
        row["mem_ratio"] = (row["peak_mib"] / base["peak_mib"]) if base["peak_mib"] == base["peak_mib"] else None
        row["max_loss_diff_vs_ref"] = max(diff.values())
    columns = [("path", "path"), ("model", "model"), ("crop", "crop"), ("batch", "batch"), ("amp", "amp"),
               ("s_per_it", "s / iteration"), ("speedup", "speed-up"), ("peak_mib", "peak MiB"),
               ("mem_ratio", "memory vs reference"), ("loss_first", "total loss, 1st it."),
               ("max_loss_diff_vs_ref", "max loss diff vs reference")]
    notes = ("One full TSCD iteration, all losses on (cls, seg, aff, CRF reg, SCD), random init, drop-path and "
             "dropout off, same weights and batches for both paths. CPU peak memory is not measured here (nan).")
    paths = write_results(f"train_step-{args.model}-{args.crop}", env, rows, columns, args.out, notes=notes)
    logger.info("wrote %s and %s", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
