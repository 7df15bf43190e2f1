"""`tscd eval`: score a checkpoint the way the field reports it (SPEC.md 6).

    tscd eval --checkpoint runs/voc/checkpoints/ckpt_0020000.pt --split val --crf

scores, on the split's masks: the segmentation head single-scale (``seg``), multi-scale + flip (``seg_ms``) and,
with ``--crf``, + dense CRF (``seg_ms_crf``); the CAM label (``cam``); the affinity-refined CAM (``aff``); and, on
training splits, the VARM pseudo labels (``pseudo``). The model and the dataset come from the checkpoint's config
(override with ``--dataset``, ``--root``, or ``section.key=value``). A table is printed and saved as
``results_<split>.json`` / ``.csv`` in ``--out`` (default ``<run dir>/eval``); ``--save-preds`` also writes palette
PNGs per output. mIoU convention: classes absent from both ground truth and prediction are excluded from the mean.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

logger = logging.getLogger("tscd.eval")


def parse_scales(text: str) -> tuple[float, ...]:
    """``"1,0.5,0.75"`` -> (1.0, 0.5, 0.75); an argparse type."""
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, e.g. 1,0.5,0.75; got {text!r}")
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, e.g. 1,0.5,0.75; got {text!r}")
    return scales


def default_out_dir(checkpoint: str | Path) -> Path:
    """``<run>/checkpoints/ckpt.pt`` -> ``<run>/eval``; any other file -> ``<its folder>/eval``."""
    path = Path(checkpoint).resolve()
    parent = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return parent / "eval"


def run(args: argparse.Namespace) -> int:
    from tscd.data import DataError
    from tscd.eval.crf import CRFParams
    from tscd.eval.evaluator import OUTPUT_TITLES, OUTPUTS, EvalSettings, build_eval_dataset, evaluate
    from tscd.eval.inference import load_model, resolve_device
    from tscd.eval.outputs import format_table, write_results

    try:
        device = resolve_device(args.device)
        loaded = load_model(args.checkpoint, device, args.overrides or [])
        cfg = loaded.config
        split = args.split or cfg.data.val_split
        if args.outputs:
            outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
            unknown = [o for o in outputs if o not in OUTPUTS]
            if unknown:
                raise ValueError(f"`--outputs`: unknown output(s) {unknown}; choose from {', '.join(OUTPUTS)}")
        else:
            outputs = ["seg", "seg_ms", "cam", "aff"]
            if split.startswith("train"):
                outputs.append("pseudo")
        if args.crf and "seg_ms_crf" not in outputs:
            outputs.append("seg_ms_crf")
        dataset = build_eval_dataset(cfg, split, args.dataset, args.root, num_classes=loaded.num_classes)
        p = cfg.pseudo
        out_dir = Path(args.out) if args.out else default_out_dir(args.checkpoint)
        settings = EvalSettings(
            outputs=outputs, seg_scales=args.scales, cam_scales=args.cam_scales or p.cam_scales,
            flip=not args.no_flip, resize_long=args.resize_long, cam_bkg=p.cam_bkg, crf=CRFParams(),
            crf_workers=args.crf_workers, num_images=args.num_images,
            pseudo=dict(bkg_high=p.bkg_high, bkg_low=p.bkg_low, scale=p.refine_scale, mode=p.refine_mode,
                        num_iter=p.refine_iters, dilations=p.dilations, backend=cfg.train.backend),
            pred_dir=out_dir / f"pred_{split}" if (args.save_preds or args.save_logits) else None,
            save_outputs=None if args.save_preds else (), save_logits=args.save_logits)
        start = time.time()
        report = evaluate(loaded.model, dataset, settings, device)
    except (FileNotFoundError, ValueError, RuntimeError, DataError) as err:
        logger.error("%s", err)
        return 1
    elapsed = time.time() - start
    from tscd.eval.evaluator import rank_and_world

    if rank_and_world()[0] != 0:
        return 0
    report.update({
        "checkpoint": str(Path(args.checkpoint).resolve()), "iteration": loaded.iteration,
        "dataset": args.dataset or cfg.data.dataset, "split": split, "model": cfg.model.name,
        "settings": {"seg_scales": list(settings.seg_scales), "cam_scales": list(settings.cam_scales),
                     "flip": settings.flip, "resize_long": settings.resize_long, "cam_bkg": settings.cam_bkg,
                     "random_walk": {"bkg": settings.rw_bkg, "radius": settings.rw_radius, "power": settings.rw_power},
                     "crf": asdict(settings.crf) if "seg_ms_crf" in outputs else None},
        "seconds": round(elapsed, 2),
        "convention": "mIoU over classes present in the ground truth or the prediction; 255 ignored; in %",
    })
    json_path, csv_path = write_results(out_dir, report, stem=f"results_{split}")
    print(f"\n{cfg.model.name} @ iteration {loaded.iteration} on {report['dataset']}/{split} "
          f"({report['num_images']} images, {elapsed:.1f} s):")
    print(format_table(report["results"], OUTPUT_TITLES))
    print(f"(mIoU excludes classes absent from both ground truth and prediction; saved {json_path} and {csv_path})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score a checkpoint (seg single/multi-scale/+CRF, CAM, affinity, pseudo)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint file (runs/<name>/checkpoints/ckpt_*.pt)")
    p.add_argument("--split", default=None, help="split to score (default: the config's data.val_split)")
    p.add_argument("--dataset", default=None, help="dataset name (default: the checkpoint's data.dataset)")
    p.add_argument("--root", default=None, help="dataset root (default: the checkpoint's data.root)")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/eval)")
    p.add_argument("--outputs", default=None,
                   help="comma-separated subset of seg,seg_ms,seg_ms_crf,cam,aff,pseudo "
                        "(default: seg,seg_ms,cam,aff; + pseudo on train splits; + seg_ms_crf with --crf)")
    p.add_argument("--scales", type=parse_scales, default=(1.0, 0.5, 0.75),
                   help="multi-scale test scales of the segmentation head (default AFA's 1,0.5,0.75)")
    p.add_argument("--cam-scales", type=parse_scales, default=None,
                   help="CAM scales (default: the config's pseudo.cam_scales)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip in the multi-scale passes")
    p.add_argument("--resize-long", type=int, default=512, help="long side of the test image; 0 keeps native size")
    p.add_argument("--crf", action="store_true", help="also score multi-scale + flip + dense CRF")
    p.add_argument("--crf-workers", type=int, default=2, help="threads for CPU CRF jobs")
    p.add_argument("--save-preds", action="store_true", help="write palette PNGs of every output")
    p.add_argument("--save-logits", action="store_true", help="write 1/4-resolution float16 logits (.pt)")
    p.add_argument("--num-images", type=int, default=None, help="score the first N images only")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. data.demo_size=64")
    p.set_defaults(func=run)
