"""The built-in demo's training iteration (configs/demo.yaml) under config variants: where its wall time goes and
what a variant would save.

Every variant is a Trainer of the demo config plus overrides, built in one process and stepped on its own copy of
the demo's training batches (the first epoch is passed by first, so images come from the generated set's cache, as
in the demo after its first 125 iterations). The variants then run interleaved: ``--rounds`` rounds of one
iteration each, the order reversed every other round, so that a VM whose speed drifts moves every variant alike.
Per variant: the median s / iteration and the median per-round ratio to the first variant (the demo itself).

The projected training time is ``cam_iters`` classification-only iterations (the ``cls-only`` variant's median)
plus ``max_iters - cam_iters`` full ones (the variant's median): the demo's schedule without its validations,
checkpoints and start-up. Against it stands the budget a variant must meet (``--budget``, seconds of training).
A variant's effect on the demo's mIoU is not measured here: train it (``tscd train --config configs/demo.yaml
KEY=VALUE ...``, two seeds at least: the demo's seed spread is several points).

    python bench/bench_demo_iteration.py                       # the default variants, 60 rounds
    python bench/bench_demo_iteration.py --rounds 20 --variant "no SCD=loss.scd=0"
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._common import environment, interleaved_times, setup_threads, write_results  # noqa: E402
from tscd.config import load_config  # noqa: E402
from tscd.train import Trainer  # noqa: E402

#: (name, overrides): the demo itself first (the ratios' base), the classification-only iteration (the projection's
#: first cam_iters iterations) last
DEFAULT_VARIANTS: list[tuple[str, list[str]]] = [
    ("demo (CAM pass at 2x)", []),
    ("CAM pass at 1.5x", ["pseudo.cam_scales=[1.5]"]),
    ("CAM pass at 1x", ["pseudo.cam_scales=[1.0]"]),
    ("decoder-free CAM passes", ["pseudo.cam_decoder=false"]),
    ("no SCD (no view 2)", ["loss.scd=0"]),
    ("batch 4", ["data.batch_size=4"]),
]
CLS_ONLY = "cls-only (the first cam_iters)"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME=section.key=value[,section.key=value...]"`` -> (name, overrides)."""
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or "=" not in rest:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=section.key=value[,section.key=value]")
    overrides, depth, start = [], 0, 0
    for i, c in enumerate(rest + ","):  # split on the commas outside brackets (list values: [1.0, 0.5])
        depth += (c in "[(") - (c in "])")
        if c == "," and depth == 0:
            overrides.append(rest[start:i].strip())
            start = i + 1
    return name.strip(), [o for o in overrides if o]


def build(config: str, overrides: list[str], run_dir: str, warm: int, skip: int) -> tuple[Trainer, object]:
    """A trainer of ``config`` + ``overrides`` past its warm-up (full iterations unless the overrides say
    otherwise), with its batch iterator ``skip`` batches in."""
    base = [f"train.run_dir={run_dir}", "train.cam_iters=0", "train.max_iters=1000000", "train.val_iters=0",
            "train.ckpt_iters=0", "train.tensorboard=false"]
    cfg = load_config(config, base + overrides)
    trainer = Trainer(cfg, resume="never")
    trainer.iteration = 10  # past any classification-only warm-up (cam_iters 0; the cls-only variant sets its own)
    batches = iter(trainer.batches)
    for _ in range(skip):
        next(batches)
    for _ in range(warm):
        trainer.train_step(next(batches))
    return trainer, batches


def run(args: argparse.Namespace) -> tuple[list[dict], tuple[int, int], float]:
    device = torch.device("cpu")
    setup_threads(device, args.threads)
    variants = list(args.variant or DEFAULT_VARIANTS) + [(CLS_ONLY, ["train.cam_iters=1000000"])]
    demo = load_config(args.config, [])
    schedule = (demo.train.cam_iters, demo.train.max_iters - demo.train.cam_iters)
    skip = -(-demo.data.demo_num_train // demo.data.batch_size) if args.skip_first_epoch else 0
    trainers = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(variants):
            print(f"building {name} ({' '.join(overrides) or 'the demo config'})", flush=True)
            trainers.append(build(args.config, overrides, f"{tmp}/v{i}", args.warm, skip))

        def step(trainer: Trainer, batches):
            return lambda k: trainer.train_step(next(batches))

        def progress(k: int, name: str, seconds: float) -> None:
            if name == variants[-1][0] and (k + 1) % 10 == 0:
                print(f"round {k + 1}/{args.rounds}", flush=True)

        by_name = interleaved_times({name: step(*tb) for (name, _), tb in zip(variants, trainers)}, args.rounds,
                                    on_step=progress)
    times = [by_name[name] for name, _ in variants]
    cls_only = statistics.median(times[-1])
    rows = []
    for (name, overrides), ts in zip(variants, times):
        med = statistics.median(ts)
        ratios = [a / b for a, b in zip(ts, times[0])]
        full = name != CLS_ONLY
        projected = schedule[0] * cls_only + schedule[1] * med if full else None
        rows.append({"variant": name, "overrides": " ".join(overrides) or "-", "s_per_it": round(med, 4),
                     "vs_demo": round(statistics.median(ratios), 3),
                     "range": f"{min(ratios):.2f}-{max(ratios):.2f}",
                     "projected_s": round(projected, 1) if projected is not None else "-",
                     "within_budget": ("yes" if projected <= args.budget else "no") if projected is not None else "-"})
    return rows, schedule, cls_only


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--variant", action="append", type=parse_variant,
                   help='"NAME=section.key=value[,...]" (repeatable; replaces the default variants; the demo config '
                        "itself is not added: give it as e.g. \"demo=train.seed=0\")")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--warm", type=int, default=10, help="iterations per variant before the rounds")
    p.add_argument("--no-skip-first-epoch", dest="skip_first_epoch", action="store_false",
                   help="time the first epoch's batches too (the demo set generated on the fly)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=180.0, help="seconds of training the schedule must fit in")
    p.add_argument("--out", default=None, help="results folder (default bench/results; <out>/cpu-<threads>t/...)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warm < 0 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1, --warm >= 0")
    names = [name for name, _ in args.variant or []]
    if len(set(names)) != len(names) or CLS_ONLY in names:
        p.error(f"--variant: the names must differ from each other and from {CLS_ONLY!r}; got {names}")
    rows, schedule, cls_only = run(args)
    env = environment(torch.device("cpu"), args.threads)
    need = (args.budget - schedule[0] * cls_only) / schedule[1]
    notes = (f"The demo's training iteration ({Path(args.config).name}) under config variants, {args.rounds} "
             f"interleaved rounds of one iteration per variant (order reversed every other round), after {args.warm} "
             f"warm-up iterations each{' and past the first epoch' if args.skip_first_epoch else ''}. s / iteration: "
             f"the median of the rounds; vs demo: the median per-round ratio to the first variant (range beside it). "
             f"Projected training: {schedule[0]} classification-only iterations at {cls_only:.4f} s plus {schedule[1]} "
             f"full ones at the variant's median (no validation, checkpoints or start-up); a budget of "
             f"{args.budget:.0f} s needs full iterations of at most {need:.4f} s. Load average at the end: "
             f"{env.get('load_average')}. What a variant does to the demo's mIoU is not measured here: train it, two "
             f"seeds at least (bench/results/cpu-2t/demo_wall.md has the variants trained).")
    columns = [("variant", "variant"), ("overrides", "overrides"), ("s_per_it", "s / iteration"),
               ("vs_demo", "vs demo (median of rounds)"), ("range", "per-round range"),
               ("projected_s", "projected training s"), ("within_budget", f"within {args.budget:.0f} s")]
    json_path, md_path = write_results("demo_iteration", env, rows, columns,
                                       out_dir=Path(args.out) if args.out else None, notes=notes)
    for r in rows:
        print(f"{r['variant']:32s} {r['s_per_it']:.4f} s/it  x{r['vs_demo']}  projected {r['projected_s']}")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
