"""The ``flowdit`` parser, put together from the command modules, and ``main``."""

from __future__ import annotations

import argparse
import errno
import sys

from .. import __version__
from ..errors import FlowditError
from . import autoencoder, bench, compress, edit, encoder, evaluate, evaluator, reflow, sample, train
from .common import _Parser

# The order of ``flowdit --help``.
COMMANDS = (train, sample, evaluate, reflow, evaluator, autoencoder, encoder, edit, compress, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``flowdit`` argument parser: one subcommand (or group) per command module."""
    p = _Parser(prog="flowdit", description="Rectified-flow diffusion transformers.")
    p.add_argument("--version", action="version", version=f"flowdit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parsers(sub)
    return p


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "(no message)"


def _os_error(exc: OSError) -> str:
    """A failed read or write as one line naming the file (disk full, read-only, ...)."""
    where = exc.filename or "a file"
    if exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}"
    reason = exc.strerror or str(exc)
    hint = {errno.ENOSPC: " (disk full: free space, then --resume)",
            errno.EROFS: " (read-only file system)",
            errno.EACCES: " (no permission)"}.get(exc.errno, "")
    return f"cannot write or read {where}: {reason}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0, 2 for any one-line error, 130 when
    interrupted). ``--help`` and ``--version`` return 0 instead of exiting."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            sub = getattr(args, "_parser", parser)
            if args.command == "train" or getattr(args, "autoencoder_command", None) == "train":  # overrides may come anywhere after the command
                bad = [a for a in extra if not _is_override(a)]
                if not bad:
                    args.overrides = list(args.overrides) + extra
                    extra = []
                else:
                    extra = bad
            if extra:
                sub.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse's --help, --version and one-line usage errors
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except FlowditError as exc:
        print(f"flowdit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"flowdit: error: {_one_line(_os_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowdit: interrupted", file=sys.stderr)
        return 130
