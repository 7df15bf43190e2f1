"""The `tscd` command line: `tscd <command> ...`.

Each command lives in its own module, which exposes ``register(subparsers)``: it adds one
sub-parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an
exit code). Adding a command means adding its module to ``COMMAND_MODULES``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Modules that register sub-commands, in the order `tscd --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "tscd.commands.info",
    "tscd.commands.train",
    "tscd.commands.bench",
    "tscd.data.cli",
    "tscd.commands.eval",
    "tscd.commands.infer",
    "tscd.commands.pseudo_labels",
    "tscd.commands.weights",
)


def setup_logging(verbose: bool = False, log_file: str | None = None) -> None:
    """Console (and optional file) logging for CLI runs; library code only uses module loggers."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tscd", description="End-to-end weakly-supervised semantic segmentation (TSCD) with fused kernels."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] == ["bench"] and "--" in argv:  # `tscd bench ... -- <script arguments>`
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = parser.parse_args(argv)
    if extra:
        args.extra = extra
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    return int(args.func(args) or 0)
