"""``tscd data ...``: prepare and check datasets.

    tscd data voc   --root VOCdevkit/VOC2012 [--workers N] [--check-images N]
    tscd data coco  --root COCO [--workers N] [--splits train val]
    tscd data check --dataset voc|coco|custom|demo --root DIR [--splits ...] [--num N]
    tscd data demo  --out DIR [--num-train N] [--num-val N] [--size S] [--seed S]

Each prints a report and exits with 0 when the data is usable, 1 when a file is bad.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # tscd.data imports torch: only the commands themselves load it
    from tscd.data.report import Report

log = logging.getLogger("tscd.data")


def _finish(report: Report) -> int:
    print(report.format())
    return 0 if report.ok else 1


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A missing path or bad file (FileNotFoundError, DataError) reaches tscd.cli.main, which prints one clear error
    line and exits 2 as every command does; a report with errors exits 1."""
    return run


def _run_voc(args: argparse.Namespace) -> int:
    from tscd.data.voc import prepare_voc

    return _finish(prepare_voc(args.root, workers=args.workers, check_images=args.check_images))


def _run_coco(args: argparse.Namespace) -> int:
    from tscd.data.coco import prepare_coco

    return _finish(prepare_coco(args.root, workers=args.workers, splits=args.splits, year=args.year,
                                check_images=args.check_images))


def _run_check(args: argparse.Namespace) -> int:
    from tscd.data.check import check_dataset

    return _finish(check_dataset(args.dataset, args.root, splits=args.splits, num=args.num, seed=args.seed))


def _run_demo(args: argparse.Namespace) -> int:
    from tscd.data.demo import write_demo

    return _finish(write_demo(args.out, num_train=args.num_train, num_val=args.num_val, size=args.size,
                              seed=args.seed))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its sub-commands to the ``tscd`` parser."""
    p = subparsers.add_parser("data", help="prepare and check datasets (VOC, COCO, custom, demo)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", metavar="<data command>")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    default_workers = max(1, min(8, os.cpu_count() or 1))

    voc = sub.add_parser("voc", help="write VOC split lists + class vectors and check the tree")
    voc.add_argument("--root", required=True, help="the VOC2012 folder (JPEGImages/, SegmentationClassAug/)")
    voc.add_argument("--workers", type=int, default=default_workers, help="processes reading masks")
    voc.add_argument("--check-images", type=int, default=100, help="images to decode fully (-1: all)")
    voc.set_defaults(func=_guarded(_run_voc))

    coco = sub.add_parser("coco", help="render COCO masks (resumable) and write split lists + class vectors")
    coco.add_argument("--root", required=True, help="COCO root (annotations/, train2014/, val2014/)")
    coco.add_argument("--workers", type=int, default=default_workers, help="processes rendering masks")
    coco.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    coco.add_argument("--year", default="2014", help="annotation year (instances_<split><year>.json)")
    coco.add_argument("--check-images", type=int, default=100, help="images to decode fully (-1: all)")
    coco.set_defaults(func=_guarded(_run_coco))

    check = sub.add_parser("check", help="load a prepared dataset and report bad files")
    check.add_argument("--dataset", required=True, choices=["voc", "coco", "custom", "demo"])
    check.add_argument("--root", required=True)
    check.add_argument("--splits", nargs="+", default=None, help="default: every split found")
    check.add_argument("--num", type=int, default=100, help="items per split to decode (-1: all)")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(func=_guarded(_run_check))

    demo = sub.add_parser("demo", help="write the generated demo set in the VOC layout")
    demo.add_argument("--out", required=True)
    demo.add_argument("--num-train", type=int, default=1000)
    demo.add_argument("--num-val", type=int, default=100)
    demo.add_argument("--size", type=int, default=96)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_guarded(_run_demo))
