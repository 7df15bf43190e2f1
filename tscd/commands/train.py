"""`tscd train`: train a recipe (``recipe:`` in the config; TSCD by default) from a YAML config (configs/voc.yaml,
coco.yaml, afa_voc.yaml, afa_coco.yaml, demo.yaml).

One process by default; several GPUs or machines with torchrun, e.g.
    torchrun --nproc_per_node 4 -m tscd train --config configs/voc.yaml
A run directory holds the resolved config, a log, TensorBoard scalars and checkpoints; running the
same command again resumes from the newest readable checkpoint (``--resume never`` starts over).
Config overrides ``section.key=value`` may stand anywhere on the line, e.g.
    tscd train --config configs/demo.yaml train.max_iters=200 --run-dir runs/demo data.batch_size=4
``--max-iters N`` shortens a run: a warm-up (``train.cam_iters``, ``optim.warmup_iters``) longer than N is scaled
with the run length, with a warning. The config that runs (every value a mode changed: --max-iters, the recipe's
defaults, train.memory, train.reference_style, train.amp: auto) is saved as <run dir>/config.yaml, with the changes
as comments; ``tscd train --config <run dir>/config.yaml`` runs it again. A start that fails (bad data, ...) removes
the run directory it created.
``--dry-run`` runs 3 iterations with all losses on and prints seconds per iteration and peak memory, writing
nothing: whether a configuration fits a GPU, in a minute.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger("tscd.train")


def run(args: argparse.Namespace) -> int:
    from tscd.cli import setup_logging
    from tscd.config import load_config

    overrides = list(args.overrides or [])
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    cfg = load_config(args.config, overrides, check=False)  # the trainer resolves and validates it
    if getattr(args, "dry_run", False):
        return dry_run_main(cfg, args.verbose, max_iters=args.max_iters)
    rank = int(os.environ.get("RANK", "0"))
    run_dir = Path(cfg.train.run_dir)
    created = rank == 0 and not run_dir.exists()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(args.verbose, log_file=str(run_dir / "train.log"))
    else:
        logging.getLogger().setLevel(logging.WARNING)

    from tscd.train import Trainer

    try:
        trainer = Trainer(cfg, resume=args.resume, max_iters=args.max_iters)
    except BaseException:
        if created:
            setup_logging(args.verbose)  # closes the log file
            remove_failed_run_dir(run_dir)
        raise
    try:
        scores = trainer.train()
    except BaseException:
        trainer.close(leave_group=False)  # a peer may be inside a collective: torchrun stops the others
        raise
    trainer.close()
    if rank == 0:
        n, cfg = trainer.num_classes + 1, trainer.cfg
        print(f"\nvalidation mIoU after {trainer.iteration} iterations ({cfg.data.dataset}, {cfg.data.val_split}, "
              f"{n} classes incl. background; protocol native, as `tscd eval` scores by default):")
        for key, title in (("seg", "segmentation head"), ("cam", f"CAM label (bkg {cfg.pseudo.cam_bkg})"),
                           ("pseudo", f"pseudo label ({cfg.pseudo.refine_mode.upper()})")):
            print(f"  {title:<24} {scores[key]['miou']:6.2f}")
        if cfg.data.dataset == "demo":
            print(f"  chance level: {chance_miou(trainer):.2f} (every pixel labelled background)")
        for key, path in getattr(trainer, "pictures", {}).items():
            print(f"picture ({key}): {path}")
        print(f"run directory: {cfg.train.run_dir}")
    return 0


def dry_run_main(cfg, verbose: bool = False, iterations: int = 3, max_iters: int | None = None) -> int:
    """``tscd train --dry-run``: :func:`tscd.train.memory.dry_run` of a loaded configuration, summary on stdout;
    returns 0."""
    from tscd.cli import setup_logging
    from tscd.train.memory import dry_run

    setup_logging(verbose)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("tscd train --dry-run: run it in one process (without torchrun); it measures one "
                         "process's share of the batch only under torchrun")
    print(dry_run(cfg, iterations, max_iters=max_iters).summary())
    return 0


def remove_failed_run_dir(run_dir: Path) -> None:
    """Remove a run directory this command created when the run failed to start (nothing of value in it yet:
    the log, the resolved config, empty TensorBoard files; never a checkpoint)."""
    import shutil

    if (run_dir / "checkpoints").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    logger.debug("removed %s (the run did not start)", run_dir)


def chance_miou(trainer) -> float:
    """mIoU of predicting background everywhere on the validation set (the baseline to beat)."""
    import torch

    from tscd.eval.metrics import ConfusionMatrix

    m = ConfusionMatrix(trainer.num_classes + 1)
    total = len(trainer.val_set) if trainer.cfg.data.val_num is None else min(trainer.cfg.data.val_num,
                                                                             len(trainer.val_set))
    for i in range(total):
        label = trainer.val_set[i]["label"]
        m.update(torch.zeros_like(label), label)
    return m.scores()["miou"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a recipe (TSCD, AFA; one GPU, CPU, or torchrun for several)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (configs/voc.yaml, coco.yaml, demo.yaml)")
    p.add_argument("--run-dir", default=None, help="run directory (overrides train.run_dir)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="overrides train.max_iters; longer warm-ups are scaled to fit, with a warning")
    p.add_argument("--resume", default="auto",
                   help="auto (newest readable checkpoint of the run directory, if any), never, or a checkpoint path")
    p.add_argument("--dry-run", action="store_true",
                   help="run 3 iterations (all losses on), print seconds per iteration and peak memory, write nothing")
    p.set_defaults(func=run, overrides=[])
