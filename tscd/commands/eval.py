"""`tscd eval`: score a checkpoint with the evaluator training validation uses (tscd/eval/evaluator.py).

    tscd eval --checkpoint runs/voc/checkpoints/ckpt_0020000.pt                     native protocol (as training logs)
    tscd eval --checkpoint runs/voc/checkpoints/ckpt_0020000.pt --protocol ms --crf  the field's MS + flip + CRF test

Protocols: ``native`` (default) scores every image at its native size, the segmentation head single-scale (``seg``),
the CAM label (``cam``), the affinity-refined CAM (``aff``) and the VARM pseudo labels (``pseudo``): the numbers
training validation logs. ``ms`` resizes the long side to 512 and adds the multi-scale + flip head (``seg_ms``) and,
with ``--crf``, + dense CRF (``seg_ms_crf``). ``--scales``, ``--cam-scales``, ``--no-flip``, ``--resize-long`` change
a protocol (then reported as ``<protocol>+custom``). The model and the dataset come from the checkpoint's config
(override with ``--dataset``, ``--root``, or ``section.key=value`` anywhere on the line). The table printed names the
protocol; it is saved as ``results_<split>_<protocol>.json`` / ``.csv`` in ``--out`` (default ``<run dir>/eval``),
numbered ``.2``, ``.3``, ... rather than overwriting an earlier result (``--overwrite`` replaces it). ``--save-preds``
also writes palette PNGs per output; ``--grid N`` draws the first N images (image | CAM | pseudo label | prediction |
ground truth, as training's val_grid.png) to ``grid_<split>_<protocol>.png``. mIoU convention: classes absent from
both ground truth and prediction are excluded from the mean. When the checkpoint's run validated that iteration
under the same protocol, the numbers its ``metrics.jsonl`` holds are printed too.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from tscd.commands._common import add_checkpoint_args, load_checkpoint_model, parse_scales
from tscd.constants import EVAL_PROTOCOLS as PROTOCOLS

logger = logging.getLogger("tscd.eval")


def run_dir_of(checkpoint: str | Path) -> Path:
    """``<run>/checkpoints/ckpt.pt`` -> ``<run>``; any other file -> its folder."""
    path = Path(checkpoint).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def default_out_dir(checkpoint: str | Path) -> Path:
    """``<run>/checkpoints/ckpt.pt`` -> ``<run>/eval``; any other file -> ``<its folder>/eval``."""
    return run_dir_of(checkpoint) / "eval"


def logged_validation(checkpoint: str | Path, iteration: int | None, protocol: str) -> dict | None:
    """The training validation of the checkpoint's iteration under ``protocol`` from its run's ``metrics.jsonl``
    (:func:`tscd.eval.metrics.read_metrics`), or None."""
    from tscd.eval.metrics import read_metrics

    found = [r for r in read_metrics(run_dir_of(checkpoint), protocol)
             if r["iteration"] == iteration and r.get("source") == "train"]
    return found[-1] if found else None


def run(args: argparse.Namespace) -> int:
    from tscd.eval.crf import CRFParams
    from tscd.eval.evaluator import (
        OUTPUT_TITLES,
        OUTPUTS,
        build_eval_dataset,
        evaluate,
        protocol_settings,
        rank_and_world,
    )
    from tscd.eval.outputs import format_table, unique_stem, write_results

    device, loaded = load_checkpoint_model(args)
    cfg = loaded.config
    split = args.split or cfg.data.val_split
    changes = {}
    if args.outputs:
        outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
        unknown = [o for o in outputs if o not in OUTPUTS]
        if unknown or not outputs:
            raise ValueError(f"`--outputs`: unknown output(s) {unknown}; choose from {', '.join(OUTPUTS)}")
        changes["outputs"] = outputs
    for flag, key in (("scales", "seg_scales"), ("cam_scales", "cam_scales"), ("resize_long", "resize_long")):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    if args.no_flip:
        changes["flip"] = False
    if args.grid is not None and args.grid < 1:
        raise ValueError(f"`--grid` must be >= 1 (images in the picture); got {args.grid}")
    if args.resize_long is not None and args.resize_long < 0:
        raise ValueError(f"`--resize-long` must be >= 0 (0 keeps the native size); got {args.resize_long}")
    settings = protocol_settings(args.protocol, cfg, device, split, **changes)
    if args.crf and "seg_ms_crf" not in settings.outputs:
        settings.outputs = [*settings.outputs, "seg_ms_crf"]
    dataset = build_eval_dataset(cfg, split, args.dataset, args.root, num_classes=loaded.num_classes)
    out_dir = Path(args.out) if args.out else default_out_dir(args.checkpoint)
    tag = settings.protocol.replace("+", "-")
    settings.crf, settings.crf_workers, settings.num_images = CRFParams(), args.crf_workers, args.num_images
    settings.pred_dir = out_dir / f"pred_{split}_{tag}" if (args.save_preds or args.save_logits) else None
    settings.save_outputs = None if args.save_preds else ()
    settings.save_logits = args.save_logits
    start = time.time()
    report = evaluate(loaded.model, dataset, settings, device)
    elapsed = time.time() - start
    if rank_and_world()[0] != 0:
        return 0
    report.update({
        "checkpoint": str(Path(args.checkpoint).resolve()), "iteration": loaded.iteration,
        "dataset": args.dataset or cfg.data.dataset, "split": split, "model": cfg.model.name,
        "protocol_description": PROTOCOLS.get(args.protocol, ""), "settings": settings.describe(),
        "seconds": round(elapsed, 2),
        "convention": "mIoU over classes present in the ground truth or the prediction; 255 ignored; in %",
    })
    stem = f"results_{split}_{tag}"
    if not args.overwrite:
        stem = unique_stem(out_dir, stem)
    json_path, csv_path = write_results(out_dir, report, stem=stem)
    print(f"\n{cfg.model.name} @ iteration {loaded.iteration} on {report['dataset']}/{split} "
          f"({report['num_images']} images, {elapsed:.1f} s), protocol {settings.protocol}: "
          f"{PROTOCOLS.get(args.protocol, '')}")
    print(format_table(report["results"], OUTPUT_TITLES))
    print(f"(mIoU excludes classes absent from both ground truth and prediction; saved {json_path} and {csv_path})")
    logged = logged_validation(args.checkpoint, loaded.iteration, settings.protocol)
    if logged is not None:  # the same evaluator: equal numbers on the same images
        scores = ", ".join(f"{o} {v:.2f}" for o, v in logged["miou"].items() if v is not None)
        print(f"training validation at iteration {logged['iteration']} ({logged['split']}, {logged['num_images']} "
              f"images, protocol {logged['protocol']}; {run_dir_of(args.checkpoint) / 'metrics.jsonl'}): {scores}")
    if args.grid:
        from tscd.visualize import eval_grid

        grid = eval_grid(loaded.model, dataset, settings, device, out_dir / f"{stem.replace('results_', 'grid_')}.png",
                         args.grid, title=f"{report['dataset']} {split}, iteration {loaded.iteration}, "
                                          f"protocol {settings.protocol}")
        print(f"picture (grid): {grid}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score a checkpoint (seg single/multi-scale/+CRF, CAM, affinity, pseudo)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, split_default="data.val_split")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/eval)")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="native",
                   help="native (default: native size, single-scale seg, as training validation logs) or ms "
                        "(long side 512, multi-scale + flip seg: the field's test protocol)")
    p.add_argument("--outputs", default=None,
                   help="comma-separated subset of seg,seg_ms,seg_ms_crf,cam,aff,pseudo (default: native "
                        "seg,cam,aff,pseudo; ms seg,seg_ms,cam,aff, + pseudo on train splits; + seg_ms_crf with --crf)")
    p.add_argument("--scales", type=parse_scales, default=None,
                   help="multi-scale test scales of the segmentation head (default AFA's 1,0.5,0.75)")
    p.add_argument("--cam-scales", type=parse_scales, default=None,
                   help="CAM scales (default: the config's pseudo.cam_scales)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip in the multi-scale passes")
    p.add_argument("--resize-long", type=int, default=None,
                   help="long side of the test image; 0 keeps the native size (default: native 0, ms 512)")
    p.add_argument("--crf", action="store_true", help="also score multi-scale + flip + dense CRF")
    p.add_argument("--crf-workers", type=int, default=2, help="threads for CPU CRF jobs")
    p.add_argument("--save-preds", action="store_true", help="write palette PNGs of every output")
    p.add_argument("--save-logits", action="store_true", help="write 1/4-resolution float16 logits (.pt)")
    p.add_argument("--num-images", type=int, default=None, help="score the first N images only")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result file of the same protocol")
    p.add_argument("--grid", type=int, default=None, metavar="N",
                   help="also draw the first N images (image | CAM | pseudo label | prediction | ground truth) "
                        "to <out>/grid_<split>_<protocol>.png")
    p.set_defaults(func=run, overrides=[])
