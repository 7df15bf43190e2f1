"""`tscd infer`: turn images into coloured masks with a trained checkpoint.

    tscd infer --checkpoint runs/voc/checkpoints/ckpt_0020000.pt photos/ --out masks/ --overlay --cam

writes ``masks/<name>.png`` (palette PNG: value = class index, VOC colours; COCO uses the same colour map), and
optionally ``overlay/<name>.png`` (colours over the image), ``cam/<name>.png`` (CAM heat map) and, with ``--grid N``,
``grid.png`` (the first N inputs: image | CAM | prediction, with the class legend). Multi-scale + flip
by default (``--scales 1 --no-flip`` for single scale), optional ``--crf``. Re-running skips finished images.
Config overrides ``section.key=value`` may stand anywhere on the line (``--set section.key=value`` still works but
is deprecated).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tscd.commands._common import add_checkpoint_args, load_checkpoint_model, parse_scales

logger = logging.getLogger("tscd.infer")


def run(args: argparse.Namespace) -> int:
    from tscd.eval.predict import collect_images, predict_images

    if args.grid is not None and args.grid < 1:
        raise ValueError(f"`--grid` must be >= 1 (images in the picture); got {args.grid}")
    if args.batch_size < 1:
        raise ValueError(f"`--batch-size` must be >= 1; got {args.batch_size}")
    images = collect_images(args.inputs)
    device, loaded = load_checkpoint_model(args)
    cam_scales = args.cam_scales or loaded.config.pseudo.cam_scales
    stats = predict_images(loaded.model, images, Path(args.out), device=device, scales=args.scales,
                           flip=not args.no_flip, resize_long_side=args.resize_long, crf=args.crf,
                           crf_workers=args.crf_workers, overlay=args.overlay, cam=args.cam,
                           cam_scales=cam_scales, save_logits=args.save_logits, batch_size=args.batch_size,
                           overwrite=args.overwrite)
    print(f"{stats['written']} image(s) written, {stats['skipped']} already done, in {args.out}")
    if args.grid:
        from tscd.visualize import class_names_for, infer_grid

        names = class_names_for(loaded.config.data.dataset, loaded.num_classes)
        grid = infer_grid(images, args.out, names, args.grid, cam=args.cam,
                          title=f"{loaded.config.model.name} @ iteration {loaded.iteration}")
        print(f"picture (grid): {grid}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("infer", help="predict coloured masks (palette PNGs) for images or folders",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scales", type=parse_scales, default=(1.0, 0.5, 0.75), help="test scales (default 1,0.5,0.75)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip")
    p.add_argument("--resize-long", type=int, default=512, help="long side of the test image; 0 keeps native size")
    p.add_argument("--crf", action="store_true", help="dense-CRF post-processing")
    p.add_argument("--crf-workers", type=int, default=2, help="threads for CPU CRF jobs")
    p.add_argument("--overlay", action="store_true", help="also write colour overlays (overlay/<name>.png)")
    p.add_argument("--cam", action="store_true", help="also write CAM heat maps (cam/<name>.png)")
    p.add_argument("--cam-scales", type=parse_scales, default=None, help="CAM scales (default: the config's)")
    p.add_argument("--save-logits", action="store_true", help="write 1/4-resolution float16 logits (.pt)")
    p.add_argument("--batch-size", type=int, default=4, help="images of equal size per forward")
    p.add_argument("--overwrite", action="store_true", help="recompute images whose outputs exist")
    p.add_argument("--grid", type=int, default=None, metavar="N",
                   help="also draw the first N inputs (image | CAM with --cam | prediction) to <out>/grid.png")
    p.set_defaults(func=run, overrides=[])
