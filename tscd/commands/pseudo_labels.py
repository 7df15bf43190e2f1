"""`tscd pseudo-labels`: export the refined pseudo labels of a split as palette PNGs.

    tscd pseudo-labels --checkpoint runs/voc/checkpoints/ckpt_0020000.pt --split train_aug --out pseudo/

Multi-scale CAMs + VARM (or PAR) refinement with the image-level labels (docs/method.md), as in training, at each
image's native size: values 0 (background), 1..C and 255 (uncertain: ignore when training a second-stage segmenter).
Settings come from the checkpoint's config (``pseudo.*``; override with ``section.key=value``). Re-running skips
finished images.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tscd.commands._common import add_checkpoint_args, load_checkpoint_model, parse_scales

logger = logging.getLogger("tscd.pseudo_labels")


def run(args: argparse.Namespace) -> int:
    from tscd.eval.evaluator import build_eval_dataset
    from tscd.eval.export import export_pseudo_labels

    device, loaded = load_checkpoint_model(args)
    cfg = loaded.config
    split = args.split or cfg.data.train_split
    dataset = build_eval_dataset(cfg, split, args.dataset, args.root, num_classes=loaded.num_classes)
    p = cfg.pseudo
    stats = export_pseudo_labels(
        loaded.model, dataset, Path(args.out), cam_scales=args.cam_scales or p.cam_scales, device=device,
        refine=dict(bkg_high=p.bkg_high, bkg_low=p.bkg_low, scale=p.refine_scale, mode=p.refine_mode,
                    num_iter=p.refine_iters, dilations=p.dilations, backend=cfg.train.backend),
        num_images=args.num_images, overwrite=args.overwrite)
    line = (f"{stats['written']} pseudo label(s) written, {stats['skipped']} already done, in {args.out}; "
            f"{100 * stats['ignored_fraction']:.1f} % of the new pixels are 255 (uncertain)")
    if stats["scores"] is not None:
        line += f"; mIoU against the split's masks {stats['scores']['miou']:.2f} (255 scored as background)"
    print(line)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pseudo-labels", help="export refined pseudo labels of a split as palette PNGs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, split_default="data.train_split")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cam-scales", type=parse_scales, default=None, help="CAM scales (default: the config's)")
    p.add_argument("--num-images", type=int, default=None, help="the first N images only")
    p.add_argument("--overwrite", action="store_true", help="recompute existing files")
    p.set_defaults(func=run, overrides=[])
