"""The `tscd` command line: `tscd <command> ...`.

Each command lives in its own module, which exposes ``register(subparsers)``: it adds one
sub-parser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an
exit code). Adding a command means adding its module to ``COMMAND_MODULES``.

One grammar for every command that reads a config (:data:`OVERRIDE_COMMANDS`): config overrides
``section.key=value`` (and ``recipe=name``) may stand anywhere after the command name, before or after options; they
reach the command as ``args.overrides`` in the order given (``--set section.key=value`` is a deprecated alias).

Errors: a user error (:data:`USER_ERRORS`: bad config, bad data, missing file, bad flag value, ...)
prints one line ``tscd <command>: error: <message>`` and exits 2; anything else is a bug and shows
the traceback. ``--debug`` (anywhere on the line) shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

#: Modules that register sub-commands, in the order `tscd --help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "tscd.commands.info",
    "tscd.commands.train",
    "tscd.commands.bench",
    "tscd.commands.data",
    "tscd.commands.eval",
    "tscd.commands.infer",
    "tscd.commands.pseudo_labels",
    "tscd.commands.weights",
)


#: Commands whose ``args.overrides`` collects ``section.key=value`` tokens from anywhere on the line.
OVERRIDE_COMMANDS: frozenset[str] = frozenset({"train", "eval", "infer", "pseudo-labels"})
#: A config override token: ``section.key=value`` (value may be empty or hold anything), or ``recipe=name``.
OVERRIDE_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*|recipe)=")

logger = logging.getLogger("tscd")


def _user_errors() -> tuple[type[BaseException], ...]:
    from tscd.config import ConfigError
    from tscd.data.io import DataError
    from tscd.errors import UserError

    # ValueError: our argument checks; FloatingPointError: a diverged loss (lower the learning rate)
    return (UserError, ConfigError, DataError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, ValueError, FloatingPointError)


#: Exception types reported as user errors (one line, exit 2); filled on first use (imports torch).
USER_ERRORS: tuple[type[BaseException], ...] = ()


def _to_log_files(line: str) -> None:
    """Record a user error in the log files (e.g. a run's train.log), which the console line does not reach."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (line,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Take the config overrides out of a command's arguments.

    Returns:
        (remaining arguments, overrides in order, deprecation notes). ``--set K=V`` and ``--set=K=V`` count as
        overrides; ``--`` ends the scan (what follows is left alone).
    """
    rest, overrides, notes = [], [], []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            rest += argv[i:]
            break
        if tok == "--set" and i + 1 < len(argv):
            overrides.append(argv[i + 1])
            notes.append(f"`--set {argv[i + 1]}` is deprecated: write `{argv[i + 1]}` anywhere on the line")
            i += 2
            continue
        if tok.startswith("--set="):
            overrides.append(tok[len("--set="):])
            notes.append(f"`{tok}` is deprecated: write `{tok[len('--set='):]}` anywhere on the line")
        elif OVERRIDE_RE.match(tok):
            overrides.append(tok)
        else:
            rest.append(tok)
        i += 1
    return rest, overrides, notes


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the stream current at set-up, which may
    have been replaced and closed since, e.g. by a test harness capturing output)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False, log_file: str | None = None) -> None:
    """Console (and optional file) logging for CLI runs; library code only uses module loggers."""
    handlers: list[logging.Handler] = [_StderrHandler()]
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
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of user errors too (may also follow the command name)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:argv.index("--")] if "--" in argv else "--debug" in argv
    if debug:  # accepted anywhere, not only before the command name
        cut = argv.index("--") if "--" in argv else len(argv)
        argv = [a for a in argv[:cut] if a != "--debug"] + argv[cut:]
    extra: list[str] = []
    if argv[:1] == ["bench"] and "--" in argv:  # `tscd bench ... -- <script arguments>`
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    overrides: list[str] = []
    notes: list[str] = []
    if command in OVERRIDE_COMMANDS:
        i = argv.index(command)
        rest, overrides, notes = split_overrides(argv[i + 1:])
        argv = argv[:i + 1] + rest
    args = parser.parse_args(argv)
    if extra:
        args.extra = extra
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if command in OVERRIDE_COMMANDS:
        args.overrides = overrides
    args.debug = debug
    setup_logging(args.verbose)
    for note in notes:
        logger.warning("%s", note)
    global USER_ERRORS
    if not USER_ERRORS:
        USER_ERRORS = _user_errors()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"tscd {args.command}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        message = str(err).strip() or type(err).__name__
        line = f"tscd {args.command}: error: {' '.join(message.splitlines())}"
        print(line, file=sys.stderr)
        _to_log_files(line)
        return 2
