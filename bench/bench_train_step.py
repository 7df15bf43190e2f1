"""Benchmark one whole TSCD training iteration (all losses on): time and peak memory of each configuration.

Rows (same weights, same batches, random init, drop-path and dropout off so that CAMs are deterministic):

* ``reference-style``: what the official code does: CAM passes through the full model (decoder and affinity
  head included) per scale and flip, one VARM call per image and threshold, pure-PyTorch ops, CRF loss on the
  host; fp32, the global batch at once.
* ``default``: the default path (multi-scale CAMs through the encoder only, one batched VARM call, fused
  kernels, backend auto); fp32, the global batch at once.
* ``compiled``, ``compiled-cams``, ``compiled-forward`` (only when asked: ``--rows``): the default path with
  ``train.compile`` ``all`` / ``cams`` (the no-grad CAM passes, one static graph per scale and view) / ``forward``
  (the trained forwards and their backward); the first timed iteration includes the compilation (its time is the
  ``1st iteration`` column), so time them with ``--timed 2`` or more.
* ``refine-every-channel`` (only when asked): the default path, its pseudo labels refining every class channel
  instead of each image's present ones (the labels are the same): with ``--classes 80`` the COCO-width cost of
  the class count.
* ``low-memory``: ``train.memory=low`` (bf16 autocast, activation checkpointing ``all``, micro-batches of one
  image). Where the trainer has no gradient accumulation (``train.accum_steps``) yet, the iteration is run as
  one ``train_step`` per image of the global batch (an optimizer step each; the peak is the same as with
  accumulation, which keeps the gradients alive between micro-batches just as these steps keep them between
  ``backward`` and ``step``), and the row says so.

Per row: ``--timed`` iterations are timed (s / iteration: the median after the first, or the first), then one
more iteration is measured with :class:`tscd.train.memory.PeakMemory` (CUDA ``max_memory_allocated``; CPU the
allocator events recorded by the profiler): peak = weights + gradients + optimizer state at its start + the
peak of tensor bytes during it (``peak_mib``), the same method for every row.

``--profile``: per row, one more iteration under ``torch.profiler`` gives the per-phase breakdown (the ``tscd/*``
ranges the trainer, the recipe and the CAM passes mark: CAM passes per scale and their decoder statistics, pseudo
labels, training forwards, the fused losses, backward, optimizer), plus the operator-level top list of the first
row's CAM passes, the iteration's FLOP count (``torch.utils.flop_counter``: matmuls, convolutions, attention) and
its share of the machine's measured fp32 matmul rate, and the data pipeline's time per batch in the main process.
Written to ``train_step-<model>-<crop>-b<batch>-phases.{md,json}``.

``--rounds R``: after the rows, R interleaved rounds of one iteration per row (the order reversed every other
round), on a machine whose speed drifts (a shared VM: the same iteration took 31-45 s in one afternoon) the fair
comparison: s / iteration is then the median of a row's R rounds, and the speed-up the median of the per-round
ratios to the first row (with their range). The rows' trainers stay alive until the end (more resident memory).

    python bench/bench_train_step.py --device cpu --crop 512 --batch 4 --model tscd_mit_b1 --timed 1
    python bench/bench_train_step.py --device cpu --rows reference-style,default,fast-switches --timed 2 --rounds 5
    python bench/bench_train_step.py --device cpu --crop 320 --batch 2 --rows default --profile
    python bench/bench_train_step.py --device cuda --crop 512 --batch 4 --model tscd_mit_b1 --timed 10
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench._common import environment, interleaved_times, setup_threads, sync, write_results  # noqa: E402
from tscd.config import load_config  # noqa: E402
from tscd.train import Trainer  # noqa: E402
from tscd.train.host_memory import host_memory_mode  # noqa: E402
from tscd.train.memory import MIB, PeakMemory, state_bytes  # noqa: E402

logger = logging.getLogger("bench_train_step")

#: row name -> (reference_style, extra overrides)
ROWS: dict[str, tuple[bool, list[str]]] = {
    "reference-style": (True, []),
    "default": (False, []),
    "compiled": (False, ["train.compile=all"]),
    "compiled-cams": (False, ["train.compile=cams"]),
    "compiled-forward": (False, ["train.compile=forward"]),
    # the default path with the refine of every channel (what the pseudo labels cost before they refined each image's
    # present classes only): the same labels, the class count's cost (--classes)
    "refine-every-channel": (False, []),
    "low-memory": (False, ["train.memory=low"]),
    # fp32 parts of low-memory (checkpointing and one-image micro-batches, without bf16: CPU bf16 is emulated)
    "low-memory-fp32": (False, ["train.checkpointing=all", "train.accum_steps=BATCH"]),
    # the switches that change numerics (docs/differences.md), one at a time, then together
    "cam-bf16": (False, ["pseudo.cam_amp=bf16"]),
    "cam-flip-separate": (False, ["pseudo.cam_flip=separate"]),
    "cam-scale1-forward": (False, ["pseudo.cam_scale1=forward"]),
    "cam-decoder-free": (False, ["pseudo.cam_decoder=false"]),
    "fast-switches": (False, ["pseudo.cam_decoder=false", "pseudo.cam_scale1=forward"]),
}
#: the rows run unless --rows says otherwise (``compiled``: minutes of inductor compilation on a 2-core CPU)
DEFAULT_ROWS = ("reference-style", "default", "low-memory")


#: the loss terms a full iteration of each recipe computes (the bench refuses a partial one)
FULL_TERMS: dict[str, set[str]] = {"tscd": {"cls", "seg", "aff", "reg", "scd"}, "afa": {"cls", "seg", "aff"},
                                   "toco": {"cls", "cls_aux", "ptc", "ctc", "seg", "reg"}}
#: the model of each recipe's row when --model is not given
DEFAULT_MODEL: dict[str, str] = {"tscd": "tscd_mit_b1", "afa": "tscd_mit_b1", "toco": "toco_vit_base"}


def make_trainer(args, name: str, run_dir: str) -> Trainer:
    reference_style, extra = ROWS[name]
    extra = [e.replace("BATCH", str(args.batch)) for e in extra]
    overrides = [
        f"recipe={args.recipe}", "data.dataset=demo", "data.train_split=train", "data.val_split=val",
        f"data.crop_size={args.crop}", f"data.demo_size={args.crop}",
        f"data.batch_size={args.batch}", "data.num_workers=0",
        f"data.demo_num_train={args.batch * (args.timed + 1)}",
        "data.demo_num_val=1", "data.scale_range=[1.0, 1.0]",
        f"model.name={args.model}", "model.drop_path_rate=0.0",
        f"train.device={args.device}", f"train.max_iters={10**6}", "train.cam_iters=0", "train.tensorboard=false",
        f"train.reference_style={str(reference_style).lower()}", f"train.run_dir={run_dir}",
        f"train.amp={args.amp}", *extra, *args.set,
    ]
    cfg = load_config(None, overrides)
    trainer = (Trainer if args.classes is None else _wide_trainer(args.classes))(cfg, resume="never")
    for m in trainer.net.modules():  # the reference-style CAM passes run the decoder's dropout, which would
        if isinstance(m, torch.nn.Dropout | torch.nn.Dropout2d):  # shift the RNG stream: off, to compare losses
            m.p = 0.0
    return trainer


def _wide_trainer(classes: int) -> type:
    """A Trainer whose demo data says it has ``classes`` foreground classes (COCO: 80): the network and the image
    labels get that width, the images keep the demo's five shapes (the present classes)."""
    class WideTrainer(Trainer):
        def _dataset(self, split: str, train: bool):
            ds = super()._dataset(split, train)
            if classes < ds.num_classes:
                raise SystemExit(f"--classes {classes}: the demo data has {ds.num_classes} classes already")
            ds.num_classes = classes
            return ds
    return WideTrainer


@contextlib.contextmanager
def every_channel(active: bool):
    """Within: the pseudo labels refine and resize every class channel (the GPU path's width, the refine's
    channel skipping off); absent classes still get probability 0, so the labels are the same."""
    if not active:
        yield
        return
    from tscd.method import labels

    saved = labels._host_reads_are_free, labels.refine
    labels._host_reads_are_free = lambda device: False
    labels.refine = lambda *a, num_channels=None, **k: saved[1](*a, **k)
    try:
        yield
    finally:
        labels._host_reads_are_free, labels.refine = saved


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
    missing = FULL_TERMS[trainer.cfg.recipe] - set(out)
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
    for gen in ("scd_gen", "crop_gen"):  # the recipe's own generator (TSCD's SCD points, ToCo's crops)
        if hasattr(trainer.recipe, gen):
            getattr(trainer.recipe, gen).manual_seed(0)
    with every_channel(name == "refine-every-channel"):
        return _run_row(name, trainer, batches, device, timed)


def _run_row(name: str, trainer: Trainer, batches: list[dict], device: torch.device, timed: int) -> dict:
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
    state = state_bytes(trainer.trained_modules(), trainer.optimizer)
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
           "s_per_it": statistics.median(times[1:] or times), "timed_iters": timed, "first_it_s": times[0],
           "peak_mib": peak / MIB, "state_mib": sum(state.values()) / MIB,
           "loss_first": first["total"], "losses_first": first}
    encode_fn = getattr(getattr(trainer.recipe, "steps", None), "encode_fn", None)
    if hasattr(encode_fn, "graphs"):  # train.compile: cams / all
        row["cam_graphs"] = len(encode_fn.graphs)
    logger.info("%-16s %.2f s/it, peak %.0f MiB (state %.0f MiB), losses of iteration 1: %s", name,
                row["s_per_it"], row["peak_mib"], row["state_mib"], {k: round(v, 5) for k, v in first.items()})
    return row


#: (label, ``tscd/*`` range, depth) of the phase table; a range's time includes the ranges inside it
PHASES: list[tuple[str, str, int]] = [
    ("labels of all micro-batches first (accumulation)", "tscd/labels", 0),
    ("forward work (labels, forwards, losses)", "tscd/terms", 0),
    ("CAM passes, both views (no grad)", "tscd/cam_passes", 1),
    ("scale {s}", "tscd/cam_pass/scale=", 2),
    ("decoder statistics (all scales)", "tscd/cam_pass/decoder_stats", 2),
    ("pseudo labels (refine)", "tscd/pseudo_label", 1),
    ("affinity labels", "tscd/affinity_label", 1),
    ("local crops: ROI, positions, windows, flags (ToCo)", "tscd/local_crops", 1),
    ("token pair labels (ToCo)", "tscd/token_label", 1),
    ("training forward, view 1", "tscd/forward/view1", 1),
    ("forward, view 2 (SCD)", "tscd/forward/view2", 1),
    ("class tokens of view 2 and the local crops, heads (ToCo)", "tscd/forward/views", 1),
    ("CRF loss", "tscd/crf_loss", 1),
    ("SCD loss", "tscd/scd_loss", 1),
    ("patch token contrast (ToCo)", "tscd/ptc_loss", 1),
    ("class token contrast (ToCo)", "tscd/ctc_loss", 1),
    ("backward", "tscd/backward", 0),
    ("optimizer (AdamW, schedule)", "tscd/optimizer", 0),
]


def _profiler(device: torch.device):
    """torch.profiler over the CPU and, on a GPU, its kernels."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def profile_phases(trainer: Trainer, batch: dict, device: torch.device) -> tuple[float, dict[str, float]]:
    """One iteration under torch.profiler: its wall time and the summed time of each ``tscd/*`` range (CPU: the
    range's wall time on the main thread; CUDA: the device time of the kernels launched inside it), seconds."""
    sync(device)
    with _profiler(device) as prof:
        t0 = time.perf_counter()
        iteration(trainer, batch)
        sync(device)
        total = time.perf_counter() - t0
    ranges: dict[str, float] = {}
    for e in prof.events():
        if e.name.startswith("tscd/"):
            us = e.device_time_total if device.type == "cuda" else e.cpu_time_total
            ranges[e.name] = ranges.get(e.name, 0.0) + us / 1e6
    return total, ranges


def phase_rows(total: float, ranges: dict[str, float]) -> list[dict]:
    rows = []
    for label, key, depth in PHASES:
        keys = sorted((k for k in ranges if k.startswith(key)), key=lambda k: float(k.split("=")[1])) \
            if key.endswith("=") else [key] if key in ranges else []
        for k in keys:
            name = label.format(s=k.split("=")[1]) if "{s}" in label else label
            rows.append({"phase": "&nbsp;" * 4 * depth + name, "s": ranges[k], "share": ranges[k] / total})
    top = sum(ranges.get(k, 0.0) for _, k, d in PHASES if d == 0)
    rows.append({"phase": "rest (zeroing gradients, loss sums, logging values)", "s": total - top,
                 "share": (total - top) / total})
    rows.append({"phase": "**iteration (profiled)**", "s": total, "share": 1.0})
    return rows


def cam_operator_top(trainer: Trainer, img: torch.Tensor, device: torch.device, n: int = 15) -> list[dict]:
    """The operators of one view's CAM passes (train mode, as in the iteration) by self time."""
    trainer.net.train()
    cams = getattr(trainer.recipe, "cams", None) or trainer.recipe.steps.cams  # ToCo's: CAM and auxiliary CAM
    cams(img)  # warm-up
    sync(device)
    with _profiler(device) as prof:
        cams(img)
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not e.key.startswith("tscd/")]
    whole = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / whole}
            for e in events[:n]]


def iteration_flops(trainer: Trainer, batch: dict) -> float:
    """FLOPs of one iteration (forward and backward; matmuls, convolutions, attention), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        iteration(trainer, batch)
    return float(counter.get_total_flops())


def data_seconds(trainer: Trainer, n: int = 3) -> float:
    """The data pipeline's time per batch in the main process (``num_workers=0``; training hides it in workers)."""
    times = []
    it = iter(trainer.train_loader)
    for _ in range(n):
        t0 = time.perf_counter()
        if next(it, None) is None:
            break
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="global batch")
    p.add_argument("--recipe", default="tscd", choices=sorted(FULL_TERMS))
    p.add_argument("--model", default=None, help="default: the recipe's (tscd_mit_b1; ToCo: toco_vit_base)")
    p.add_argument("--timed", type=int, default=1,
                   help="timed iterations per row before the measured one (0: time the measured one)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                   help=f"comma-separated subset of {', '.join(ROWS)} (default {','.join(DEFAULT_ROWS)})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for every row (repeatable), e.g. toco.local_crop_size=16 at small crops")
    p.add_argument("--classes", type=int, default=None,
                   help="foreground classes of the network and the labels (e.g. 80: COCO width; the demo images "
                        "keep their 5 shapes); default: the demo's 5")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", default="off", choices=["off", "bf16"], help="amp of the fp32 rows")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true",
                   help="also the per-phase breakdown, CAM operator top list and FLOPs (-phases.md/json)")
    p.add_argument("--rounds", type=int, default=0,
                   help="then this many interleaved rounds (one iteration per row each): medians and per-round "
                        "speed-ups replace the per-row times (a drifting machine's fair comparison)")
    args = p.parse_args(argv)
    args.model = args.model or DEFAULT_MODEL[args.recipe]
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
    profiles: dict[str, dict] = {}
    t_start = time.time()
    for name in names:
        trainer = trainers[name]
        rows.append(run_row(name, trainer, batches, device, args.timed))
        if args.profile:
            total, ranges = profile_phases(trainer, batches[-1], device)
            flops = iteration_flops(trainer, batches[-1])
            rows[-1]["gflop"] = flops / 1e9
            if device.type == "cpu":
                rows[-1]["matmul_peak_share"] = flops / rows[-1]["s_per_it"] / (env["peak_fp32_gflops"] * 1e9)
            profiles[name] = {"total_s": total, "ranges": ranges, "phases": phase_rows(total, ranges)}
            if name == ("default" if "default" in names else names[0]):
                profiles[name]["cam_ops"] = cam_operator_top(trainer, batches[-1]["img"].to(device), device)
                profiles[name]["data_s_per_batch"] = data_seconds(trainer)
            logger.info("%-16s profiled: %s", name, {k: round(v, 3) for k, v in sorted(ranges.items())})
        if not args.rounds:
            del trainers[name]  # free its weights and optimizer state before the next row
        del trainer
        write_rows(args, env, rows, load_before, t_start)  # after every row: a later row's failure keeps these
    if args.rounds:
        interleaved_rounds(trainers, rows, batches, device, args.rounds)
        for row in rows:
            if "gflop" in row and device.type == "cpu":
                row["matmul_peak_share"] = row["gflop"] * 1e9 / row["s_per_it"] / (env["peak_fp32_gflops"] * 1e9)
        write_rows(args, env, rows, load_before, t_start)
    if args.profile:
        paths = write_phases(f"{result_stem(args)}-phases", env, rows, profiles, args.out)
        logger.info("wrote %s and %s", *paths)
    return 0


def interleaved_rounds(trainers: dict[str, Trainer], rows: list[dict], batches: list[dict], device: torch.device,
                       rounds: int) -> None:
    """``--rounds``: one iteration of every row per round, the order reversed every other round; each row's
    ``s_per_it`` becomes the median of its rounds, ``round_speedups`` its per-round ratios to the first row."""
    def step(name: str):
        def run(k: int) -> None:
            with every_channel(name == "refine-every-channel"):
                iteration(trainers[name], batches[k % len(batches)])
        return run

    names = [r["path"] for r in rows]
    times = interleaved_times({n: step(n) for n in names}, rounds, device,
                              on_step=lambda k, name, t: logger.info("round %d  %-16s %.2f s", k + 1, name, t))
    base = times[names[0]]
    for row in rows:
        t = times[row["path"]]
        row["s_per_it_rows"] = row["s_per_it"]
        row["s_per_it"], row["round_times"] = statistics.median(t), t
        row["round_speedups"] = [b / x for b, x in zip(base, t)]


def write_rows(args, env: dict, rows: list[dict], load_before, t_start: float) -> None:
    """Write the rows so far (``train_step-<model>-<crop>-b<batch>[-c<classes>].{md,json}``)."""
    device = torch.device(args.device)
    load_after = os.getloadavg()
    base = rows[0]
    for row in rows:
        row["speedup"] = (statistics.median(row["round_speedups"]) if "round_speedups" in row
                          else base["s_per_it"] / row["s_per_it"])
        if "round_speedups" in row:
            row["speedup_range"] = f"{min(row['round_speedups']):.2f}-{max(row['round_speedups']):.2f}"
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
    terms = ", ".join(sorted(FULL_TERMS[args.recipe]))
    notes = (f"One full {args.recipe} iteration per row (recipe: {args.recipe}), all losses on ({terms}), random init, "
             f"drop-path and dropout off, same weights and batches for every row. Peak memory: {how}, one "
             f"measured iteration after {args.timed} timed one(s); weights, gradients and optimizer state "
             f"included. s / iteration: median of the timed iterations after the first (or the first"
             + (", here the measured iteration itself, under the profiler)." if args.timed == 0 else ").")
             + (f" Machine load (1-min load average on {os.cpu_count()} cores): {load_before[0]:.1f} at the "
                f"start, {load_after[0]:.1f} at the end ({(time.time() - t_start) / 60:.0f} min); times on a "
                f"loaded machine are indicative only. bf16 on this CPU is emulated and slow: the low-memory "
                f"row's time is not what a GPU shows, its memory is the proxy. Host memory: "
                + ("reuse (glibc keeps freed memory for the next iteration, `train.host_memory`, every row; "
                   "`--set train.host_memory=system` measures without)." if host_memory_mode() == "reuse" else
                   "system (glibc's defaults: large blocks are mapped fresh and faulted in on every use; "
                   "times then depend on the machine's page-fault cost).") if device.type == "cpu" else ""))
    if any(r["accumulation"] == "emulated" for r in rows):
        notes += (" low-memory: gradient accumulation (train.accum_steps) not in this version: the iteration ran "
                  "as one train_step per image (see bench/bench_train_step.py).")
    if any("compiled" in r["path"] for r in rows):
        columns.insert(8, ("first_it_s", "1st iteration s (compiling)"))
        columns.insert(9, ("cam_graphs", "CAM graphs compiled"))
        notes += (" Compiled rows: the 1st iteration includes inductor's compilation (a warm cache on disk, "
                  "~/.cache or /tmp/torchinductor_*, shortens it on later runs).")
    if args.classes is not None:
        notes += (f" Class width: the network and the labels have {args.classes} foreground classes, the demo "
                  f"images 5 shapes (up to 3 present per image).")
    if args.profile:
        columns += [("gflop", "GFLOP / iteration"), ("matmul_peak_share", "of the matmul peak")]
    if any("round_speedups" in r for r in rows):
        i = [c[0] for c in columns].index("speedup")
        columns[i] = ("speedup", f"speed-up vs {base['path']} (median of rounds)")
        columns.insert(i + 1, ("speedup_range", "per-round range"))
        columns.insert(i, ("s_per_it_rows", "s / iteration, row by row"))
        notes += (f" Then {args.rounds} interleaved rounds (one iteration of every row per round, the order reversed "
                  f"every other round): s / iteration is the median of a row's rounds, the speed-up the median of "
                  f"the per-round ratios (range beside it); `s / iteration, row by row` is the rows' own timing.")
    out = [{k: v for k, v in r.items() if k != "losses_first"} for r in rows]
    paths = write_results(result_stem(args), env, out, columns, args.out, notes=notes)
    logger.info("wrote %s and %s", *paths)


def result_stem(args) -> str:
    return f"train_step-{args.model}-{args.crop}-b{args.batch}" + (f"-c{args.classes}" if args.classes else "")


def write_phases(op: str, env: dict, rows: list[dict], profiles: dict[str, dict], out_dir) -> tuple:
    """The per-phase tables (one column pair per row), the CAM operator list and the FLOP figures."""
    import json
    from pathlib import Path

    from bench._common import RESULTS_DIR, device_tag

    out = (Path(out_dir) if out_dir is not None else RESULTS_DIR) / device_tag(env)
    out.mkdir(parents=True, exist_ok=True)
    # not "rows": bench/report.py renders the iteration rows from the main result file already
    (out / f"{op}.json").write_text(json.dumps({"op": op, "env": env, "iterations": rows, "profiles": profiles},
                                               indent=2) + "\n")
    names = list(profiles)
    timing = "device time of the kernels launched in each range" if env["device_type"] == "cuda" else \
        "wall time of each range on the main thread"
    lines = [f"# {op} on {env['device']}", "",
             f"torch {env['torch']}, threads {env['threads']}, git {env['git']}, {env['date']}, load average "
             f"{env.get('load_average')}, cpp kernels {env.get('cpu_isa')}", "",
             f"One post-warm-up iteration per path under torch.profiler ({timing}; a range includes the ranges "
             f"indented below it). The profiled iteration runs a little slower than the timed ones "
             f"(bench/bench_train_step.py).", ""]
    lines.append("| phase | " + " | ".join(f"{n}: s | {n}: share" for n in names) + " |")
    lines.append("|---|" + "---|---|" * len(names))
    by_name = {n: {r["phase"]: r for r in profiles[n]["phases"]} for n in names}
    phases = phase_rows(1.0, {k: 0.0 for n in names for k in profiles[n]["ranges"]})  # the union, in order
    for r in phases:
        cells = []
        for n in names:
            x = by_name[n].get(r["phase"])
            cells += [f"{x['s']:.3g}", f"{100 * x['share']:.1f} %"] if x else ["-", "-"]
        lines.append(f"| {r['phase']} | " + " | ".join(cells) + " |")
    lines += ["", "Iteration FLOPs (forward + backward: matmuls, convolutions, attention; torch.utils.flop_counter) "
              "and their rate against the machine's fp32 matmul rate "
              f"({env.get('peak_fp32_gflops')} GFLOP/s, {env['threads']} threads, 2048^3 torch.mm):", "",
              "| path | GFLOP / iteration | s / iteration (timed) | GFLOP/s | of the matmul peak |",
              "|---|---|---|---|---|"]
    for r in rows:
        if "gflop" in r:
            rate = r["gflop"] / r["s_per_it"]
            share = f"{100 * r['matmul_peak_share']:.0f} %" if "matmul_peak_share" in r else "-"
            lines.append(f"| {r['path']} | {r['gflop']:.0f} | {r['s_per_it']:.3g} | {rate:.0f} | {share} |")
    first = "default" if "default" in names else names[0]
    p0 = profiles[first]
    if "data_s_per_batch" in p0:
        lines += ["", f"Data pipeline, main process (num_workers=0): {p0['data_s_per_batch']:.3f} s per batch "
                  "(training overlaps it in loader workers)."]
    if "cam_ops" in p0:
        lines += ["", f"Operators of one view's multi-scale CAM passes ({first}, train mode), by self time:", "",
                  "| operator | calls | self ms | share |", "|---|---|---|---|"]
        lines += [f"| {o['op']} | {o['calls']} | {o['self_ms']:.1f} | {100 * o['share']:.1f} % |"
                  for o in p0["cam_ops"]]
    md = out / f"{op}.md"
    md.write_text("\n".join(lines) + "\n")
    return out / f"{op}.json", md


if __name__ == "__main__":
    raise SystemExit(main())
