"""What each part of TSCD adds, on the built-in demo: the ablation table (markdown + JSON).

Rows (same config, schedule and seed; only the loss weights / refinement change):

=========  ================================================================================
cam        classification loss only (the CAM baseline; the segmentation head is not trained)
afa        + segmentation and affinity losses on PAR-refined pseudo labels (AFA-style)
varm       VARM instead of PAR
scd        + the self-correlation distillation loss (SCD)
tscd       + the CRF energy loss: full TSCD
toco       ToCo (``recipe: toco``) on the tiny ViT: another network, trained from scratch (no shared warm-up)
=========  ================================================================================

The classification-only warm-up (``train.cam_iters``) is the same in every row, so it is trained once
(the ``tscd`` row, with a checkpoint at ``cam_iters``) and the other rows resume from that checkpoint.

    python bench/demo_ablation.py                                   # the demo config as it is
    python bench/demo_ablation.py --max-iters 400 --cam-iters 200 --val-num 50   # a shortened run
    python bench/demo_ablation.py --max-iters 500 --cam-iters 300 --warm-ckpt W.pt --jobs 5   # rows in parallel

Writes ``<out>/demo_ablation.json`` and ``<out>/demo_ablation.md`` (default ``bench/results/cpu-2t``), with
the device, the machine load (``os.getloadavg``) and the wall time of every row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: ToCo on the demo: the tiny ViT (patch 8: 12x12 tokens on 96 px), local crops of 32 px (a third of the image,
#: as ToCo's 96 px of a 448 crop is a fifth), projection heads scaled down with the network, its own warm-up
#: (seg and reg off while n <= train.cam_iters: the demo's 700)
TOCO_DEMO = ["recipe=toco", "model.name=toco_vit_tiny", "toco.aux_layer=-2", "toco.local_crop_size=32",
             "toco.proj_dim=256", "toco.proj_hidden=256", "toco.proj_bottleneck=64"]
ROWS: list[tuple[str, str, list[str]]] = [
    ("tscd", "full TSCD (+ CRF loss)", []),
    ("cam", "cls only (CAM)", ["loss.seg=0", "loss.aff=0", "loss.reg=0", "loss.scd=0"]),
    ("afa", "+ seg/aff on PAR pseudo labels (AFA-style)", ["loss.reg=0", "loss.scd=0", "pseudo.refine_mode=par"]),
    ("varm", "+ VARM instead of PAR", ["loss.reg=0", "loss.scd=0"]),
    ("scd", "+ SCD", ["loss.reg=0"]),
    ("toco", "ToCo (recipe: toco) on the tiny ViT, from scratch", TOCO_DEMO),
]
ORDER = ["cam", "afa", "varm", "scd", "tscd", "toco"]  # table order (the tscd row runs first: it makes the warm-up)
#: rows with a network of their own: they train from scratch (the MiT warm-up checkpoint does not fit them)
FROM_SCRATCH = {"toco"}


def _load() -> str:
    try:
        return "load average %.1f %.1f %.1f" % os.getloadavg()
    except OSError:
        return "load average n/a"


def run_row(name: str, extra: list[str], args, run_root: Path, resume: str) -> dict:
    run_dir = run_root / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "tscd", "train", "--config", str(args.config), "--run-dir", str(run_dir),
           "--resume", resume, f"train.max_iters={args.max_iters}", f"train.cam_iters={args.cam_iters}",
           f"train.ckpt_iters={args.cam_iters}", "train.val_iters=0", "train.tensorboard=false",
           "train.plots=false", *([f"data.val_num={args.val_num}"] if args.val_num else []), *args.overrides,
           *extra]
    load0, t0 = _load(), time.time()
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.time() - t0
    scores = json.loads((run_dir / "final_scores.json").read_text())
    row = {"row": name, "overrides": extra, "wall_s": round(wall, 1), "load_start": load0, "load_end": _load(),
           **{f"{k}_miou": round(scores[k]["miou"], 2) for k in ("seg", "cam", "pseudo")}}
    print(f"[{name}] seg {row['seg_miou']} cam {row['cam_miou']} pseudo {row['pseudo_miou']} ({wall:.0f} s)",
          flush=True)
    return row


def markdown(result: dict) -> str:
    titles = {name: title for name, title, _ in ROWS}
    scratch = all(r["row"] in FROM_SCRATCH for r in result["rows"])
    warm = ("warm-up (ToCo: seg and reg off), each row from scratch" if scratch else "cls-only warm-up, shared")
    lines = [f"Demo ablation: {result['max_iters']} iterations ({result['cam_iters']} {warm}), "
             f"val on {result['val_num'] or 'all'} images, seed {result['seed']}; {result['device']}; "
             f"{result['note']}".rstrip("; "), "",
             "| variant | seg mIoU | CAM mIoU | pseudo-label mIoU | wall (s) | load |",
             "|---|---:|---:|---:|---:|---|"]
    for r in sorted(result["rows"], key=lambda r: ORDER.index(r["row"])):
        seg = "(not trained)" if r["row"] == "cam" else f"{r['seg_miou']:.1f}"
        lines.append(f"| {titles[r['row']]} | {seg} | {r['cam_miou']:.1f} | {r['pseudo_miou']:.1f} | "
                     f"{r['wall_s']:.0f} | {r['load_start'].replace('load average ', '')} |")
    lines.append("")
    if scratch:
        lines.append("Wall times include the whole schedule.")
    else:
        lines.append("Wall times exclude the shared warm-up" + (" (rows run in parallel)." if result.get("jobs", 1) > 1
                                                                 else " (except the first row's); a row trained from "
                                                                      "scratch (ToCo) includes it."))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--max-iters", type=int, default=None, help="default: the config's train.max_iters")
    p.add_argument("--cam-iters", type=int, default=None, help="default: the config's train.cam_iters")
    p.add_argument("--val-num", type=int, default=None, help="validate on the first N val images (default all)")
    p.add_argument("--rows", default=",".join(ORDER), help="comma-separated subset of " + ",".join(ORDER))
    p.add_argument("--run-root", default=str(ROOT / "runs" / "demo_ablation"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu-2t"))
    p.add_argument("--warm-ckpt", default=None, help="resume every row from this cls-only checkpoint (at "
                   "--cam-iters) instead of training the warm-up in the tscd row")
    p.add_argument("--jobs", type=int, default=1, help="with --warm-ckpt: rows run at once (one torch thread each "
                   "is best on a small CPU: OMP_NUM_THREADS=1)")
    p.add_argument("--note", default="", help="free text for the table header (e.g. the machine's state)")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every row")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tscd.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    args.max_iters = args.max_iters or cfg.train.max_iters
    args.cam_iters = cfg.train.cam_iters if args.cam_iters is None else args.cam_iters
    if not 0 < args.cam_iters < args.max_iters:
        p.error(f"need 0 < --cam-iters < --max-iters; got {args.cam_iters}, {args.max_iters}")
    wanted = args.rows.split(",")
    unknown = set(wanted) - set(ORDER)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from {ORDER}")
    run_root = Path(args.run_root)
    rows = []
    todo = [(name, extra) for name, _, extra in ROWS if name in wanted]
    if args.warm_ckpt:  # every row resumes from the given warm-up checkpoint, --jobs at a time
        warm = Path(args.warm_ckpt)
        if not warm.is_file():
            raise FileNotFoundError(f"--warm-ckpt {warm} is not a file")
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(lambda r: run_row(r[0], r[1], args, run_root,
                                                   "never" if r[0] in FROM_SCRATCH else str(warm)), todo))
    else:
        warm = run_root / "tscd" / "checkpoints" / f"ckpt_{args.cam_iters:07d}.pt"
        for name, _, extra in ROWS:  # tscd first: its checkpoint at cam_iters is everyone's warm-up
            if name not in wanted and (name != "tscd" or all(n in FROM_SCRATCH for n in wanted)):
                continue
            resume = "never" if name == "tscd" or name in FROM_SCRATCH else str(warm)
            if resume != "never" and not warm.is_file():
                raise FileNotFoundError(f"warm-up checkpoint {warm} is missing")
            if name == "tscd":  # keep the warm-up checkpoint out of reach of keep_ckpts
                row = run_row(name, [*extra, "train.keep_ckpts=1000"], args, run_root, resume)
            else:
                row = run_row(name, extra, args, run_root, resume)
            rows.append(row)
    import torch

    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() and cfg.train.device != "cpu"
              else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads)")
    result = {"config": str(args.config), "max_iters": args.max_iters, "cam_iters": args.cam_iters,
              "val_num": args.val_num, "seed": cfg.train.seed, "overrides": args.overrides, "device": device,
              "note": args.note, "jobs": args.jobs if args.warm_ckpt else 1,
              "rows": [r for r in rows if r["row"] in wanted]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "demo_ablation.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {out / 'demo_ablation.json'}, {out / 'demo_ablation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
