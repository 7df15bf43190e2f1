"""Benchmark one whole TSCD training iteration (all losses on): time and peak memory of each configuration.

Rows (same weights, same batches, random init, drop-path and dropout off so that CAMs are deterministic):

* ``reference-style``: what the official code does: CAM passes through the full model (decoder and affinity
  head included) per scale and flip, one VARM call per image and threshold, pure-PyTorch ops, CRF loss on the
  host; fp32, the global batch at once.
* ``default``: the default path (multi-scale CAMs through the encoder only, one batched VARM call, fused
  kernels, backend auto); fp32, the global batch at once.
* ``low-memory``: ``train.memory=low`` (bf16 autocast, activation checkpointing ``all``, micro-batches of one
  image). Where the trainer has no gradient accumulation (``train.accum_steps``) yet, the iteration is run as
  one ``train_step`` per image of the global batch (an optimizer step each; the peak is the same as with
  accumulation, which keeps the gradients alive between micro-batches just as these steps keep them between
  ``backward`` and ``step``), and the row says so.

Per row: ``--timed`` iterations are timed (s / iteration: the median after the first, or the first), then one
more iteration is measured with :class:`tscd.train.memory.PeakMemory` (CUDA ``max_memory_allocated``; CPU the
allocator events recorded by the profiler): peak = weights + gradients + optimizer state at its start + the
peak of tensor bytes during it (``peak_mib``), the same method for every row.

    python bench/bench_train_step.py --device cpu --crop 512 --batch 4 --model tscd_mit_b1 --timed 1
    python bench/bench_train_step.py --device cuda --crop 512 --batch 4 --model tscd_mit_b1 --timed 10
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
from tscd.train.memory import MIB, PeakMemory, state_bytes  # noqa: E402

logger = logging.getLogger("bench_train_step")

#: row name -> (reference_style, extra overrides)
ROWS: dict[str, tuple[bool, list[str]]] = {
    "reference-style": (True, []),
    "default": (False, []),
    "low-memory": (False, ["train.memory=low"]),
}


def make_trainer(args, name: str, run_dir: str) -> Trainer:
    reference_style, extra = ROWS[name]
    overrides = [
        "data.dataset=demo", "data.train_split=train", "data.val_split=val",
        f"data.crop_size={args.crop}", f"data.demo_size={args.crop}",
        f"data.batch_size={args.batch}", "data.num_workers=0",
        f"data.demo_num_train={args.batch * (args.timed + 1)}",
        "data.demo_num_val=1", "data.scale_range=[1.0, 1.0]",
        f"model.name={args.model}", "model.drop_path_rate=0.0",
        f"train.device={args.device}", f"train.max_iters={10**6}", "train.cam_iters=0", "train.tensorboard=false",
        f"train.reference_style={str(reference_style).lower()}", f"train.run_dir={run_dir}",
        f"train.amp={args.amp}", *extra,
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, resume="never")
    for m in trainer.net.modules():  # the reference-style CAM passes run the decoder's dropout, which would
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):  # shift the RNG stream: off, to compare losses
            m.p = 0.0
    return trainer


def micro_batches(trainer: Trainer, batch: dict) -> list[dict]:
    """The batch as one ``train_step`` input, or split into single images where accumulation is emulated."""
    if trainer.cfg.train.memory != "low" or hasattr(trainer.cfg.train, "accum_steps"):
        return [batch]
    n = batch["img"].shape[0]
    return [{k: (v[i:i + 1] if isinstance(v, torch.Tensor) else v[i:i + 1] if isinstance(v, list) else v)
             for k, v in batch.items()} for i in range(n)]


def iteration(trainer: Trainer, batch: dict) -> dict:
    # past the cls-only warm-up (the official cam_iters + 1 iterations): every row measures the full objective
    trainer.iteration = max(trainer.iteration, trainer.cfg.train.cam_iters + 1) + 1
    losses = [trainer.train_step(mb) for mb in micro_batches(trainer, batch)]
    out = {k: statistics.fmean(lo[k] for lo in losses) for k in losses[0]}
    missing = {"cls", "seg", "aff", "reg", "scd"} - set(out)
    if missing:
        raise RuntimeError(f"bench_train_step: the iteration did not compute {sorted(missing)}: not a full iteration")
    return out


def init_optimizer_state(trainer: Trainer) -> None:
    """One AdamW step with zero gradients: creates the moments; the update is the weight decay at the first
    warm-up learning rate only (relative change ~1e-12), the same for every row."""
    for p in trainer.net.parameters():
        p.grad = torch.zeros_like(p)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def run_row(name: str, trainer: Trainer, batches: list[dict], device: torch.device, timed: int) -> dict:
    torch.manual_seed(0)
    trainer.recipe.scd_gen.manual_seed(0)
    times, first = [], None
    for batch in batches[:timed]:
        sync(device)
        t0 = time.perf_counter()
        losses = iteration(trainer, batch)
        sync(device)
        times.append(time.perf_counter() - t0)
        first = first or losses
        logger.info("%-16s iteration %d: %.2f s", name, len(times), times[-1])
    if not trainer.optimizer.state:  # no timed iteration: create AdamW's moments so that the peak counts them
        init_optimizer_state(trainer)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    state = state_bytes(trainer.net, trainer.optimizer)
    sync(device)
    t0 = time.perf_counter()
    with PeakMemory(device) as pm:
        losses = iteration(trainer, batches[timed])
    sync(device)
    if not times:  # --timed 0: the measured iteration's time (under the CPU profiler: a little slower)
        times.append(time.perf_counter() - t0)
        first = losses
    if device.type == "cuda":
        peak = pm.max_allocated_bytes
    else:
        peak = sum(state.values()) + pm.peak_bytes
    emulated = len(micro_batches(trainer, batches[0])) > 1
    tc = trainer.cfg.train
    row = {"path": name, "model": trainer.cfg.model.name, "crop": trainer.cfg.data.crop_size,
           "batch": trainer.cfg.data.batch_size, "amp": "bf16" if trainer.amp else "off",
           "checkpointing": tc.checkpointing,
           "micro_batch": 1 if emulated else trainer.cfg.data.batch_size // getattr(tc, "accum_steps", 1),
           "accumulation": "emulated" if emulated else ("accum_steps" if trainer.cfg.train.memory == "low" else "-"),
           "s_per_it": statistics.median(times[1:] or times), "timed_iters": timed,
           "peak_mib": peak / MIB, "state_mib": sum(state.values()) / MIB,
           "loss_first": first["total"], "losses_first": first}
    logger.info("%-16s %.2f s/it, peak %.0f MiB (state %.0f MiB), losses of iteration 1: %s", name,
                row["s_per_it"], row["peak_mib"], row["state_mib"], {k: round(v, 5) for k, v in first.items()})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="global batch")
    p.add_argument("--model", default="tscd_mit_b1")
    p.add_argument("--timed", type=int, default=1,
                   help="timed iterations per row before the measured one (0: time the measured one)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", default="off", choices=["off", "bf16"], help="amp of the fp32 rows")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names = [n for n in args.rows.split(",") if n]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        p.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    device = torch.device(args.device)
    setup_threads(device, args.threads)
    env = environment(device, args.threads)
    load_before = os.getloadavg()
    trainers = {n: make_trainer(args, n, f"/tmp/tscd_bench_{n}") for n in names}
    first = trainers[names[0]]
    for t in trainers.values():
        t.net.load_state_dict(copy.deepcopy(first.net.state_dict()))
    it = iter(first.train_loader)
    batches = [next(it) for _ in range(args.timed + 1)]
    rows = []
    t_start = time.time()
    for name in names:
        rows.append(run_row(name, trainers[name], batches, device, args.timed))
        del trainers[name]  # free its weights and optimizer state before the next row
    load_after = os.getloadavg()
    base = rows[0]
    for row in rows:
        row["speedup"] = base["s_per_it"] / row["s_per_it"]
        row["mem_ratio"] = row["peak_mib"] / base["peak_mib"]
        row["max_loss_diff_vs_first"] = max(abs(row["losses_first"][k] - base["losses_first"][k])
                                            for k in base["losses_first"])
    columns = [("path", "path"), ("model", "model"), ("crop", "crop"), ("batch", "global batch"),
               ("micro_batch", "micro-batch"), ("amp", "amp"), ("checkpointing", "checkpointing"),
               ("s_per_it", "s / iteration"), ("speedup", f"speed-up vs {base['path']}"), ("peak_mib", "peak MiB"),
               ("mem_ratio", f"memory vs {base['path']}"), ("state_mib", "weights+optimizer MiB"),
               ("loss_first", "total loss, 1st it."), ("max_loss_diff_vs_first", f"max loss diff vs {base['path']}")]
    how = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
           "the CPU allocator's events (torch profiler, profile_memory): tensor bytes, not RSS")
    notes = (f"One full TSCD iteration per row, all losses on (cls, seg, aff, CRF reg, SCD), random init, "
             f"drop-path and dropout off, same weights and batches for every row. Peak memory: {how}, one "
             f"measured iteration after {args.timed} timed one(s); weights, gradients and optimizer state "
             f"included. s / iteration: median of the timed iterations after the first (or the first"
             + (", here the measured iteration itself, under the profiler)." if args.timed == 0 else ").")
             + (f" Machine load (1-min load average on {os.cpu_count()} cores): {load_before[0]:.1f} at the "
                f"start, {load_after[0]:.1f} at the end ({(time.time() - t_start) / 60:.0f} min); times on a "
                f"loaded machine are indicative only. bf16 on this CPU is emulated and slow: the low-memory "
                f"row's time is not what a GPU shows, its memory is the proxy." if device.type == "cpu" else ""))
    if any(r["accumulation"] == "emulated" for r in rows):
        notes += (" low-memory: gradient accumulation (train.accum_steps) not in this version: the iteration ran "
                  "as one train_step per image (see bench/bench_train_step.py).")
    for r in rows:
        r.pop("losses_first")
    paths = write_results(f"train_step-{args.model}-{args.crop}-b{args.batch}", env, rows, columns, args.out,
                          notes=notes)
    logger.info("wrote %s and %s", *paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
