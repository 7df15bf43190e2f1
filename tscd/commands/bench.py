"""`tscd bench`: run the benchmark scripts of bench/ and regenerate the report.

    tscd bench                          every op on the CPU (2 threads), then bench/report.py
    tscd bench refine correlation --device cuda
    tscd bench refine --sizes 160 -- --channels 21     (arguments after -- go to the scripts)

Each script checks its backends against the torch reference before timing and writes
bench/results/<device>/<op>.{json,md}; the report renders them into bench/results/README.md, plots,
and the README's performance section. Needs the source checkout (the bench/ folder).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

#: op name -> script in bench/
SCRIPTS = {
    "refine": "bench_refine.py",
    "correlation": "bench_correlation.py",
    "permutohedral": "bench_permutohedral.py",
    "model": "bench_model.py",
    "train_step": "bench_train_step.py",
}


def bench_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "bench"
    if not (path / "_common.py").is_file():
        raise FileNotFoundError(f"tscd bench needs the source checkout's bench/ folder (looked in {path}); install "
                                "with `pip install -e .` from a clone")
    return path


def run(args: argparse.Namespace) -> int:
    root = bench_dir()
    ops = args.ops or [op for op, script in SCRIPTS.items() if (root / script).is_file()]
    unknown = [op for op in ops if op not in SCRIPTS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; choose from {', '.join(SCRIPTS)}")
    failed = []
    for op in ops:
        script = root / SCRIPTS[op]
        if not script.is_file():
            raise FileNotFoundError(f"{script} does not exist")
        cmd = [sys.executable, str(script), "--device", args.device]
        if args.sizes and op != "train_step":
            cmd += ["--sizes", args.sizes]
        if args.device == "cpu" and op != "model":
            cmd += ["--threads", str(args.threads)]
        cmd += args.extra
        logger.info("running %s", " ".join(cmd))
        if subprocess.run(cmd, cwd=root.parent).returncode != 0:
            failed.append(op)
    if not args.no_report:
        subprocess.run([sys.executable, str(root / "report.py")], cwd=root.parent, check=False)
    if failed:
        logger.error("benchmarks failed: %s", ", ".join(failed))
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmark the fused ops and the training step vs the torch reference",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", nargs="*", help=f"ops to run (default: all): {', '.join(SCRIPTS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sizes", default=None, help="sizes, passed to the scripts (their meaning differs per op)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--no-report", action="store_true", help="do not regenerate bench/results/README.md")
    p.set_defaults(func=run, extra=[])
