"""What every ``flowdit`` command shares: the parser with one-line errors, option types,
and the checks that run before any work."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import ConfigError


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the help already says it or
    there is none to show (a flag, or an optional value without one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and defaults in every ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        # The same prefix as every other error, so that scripts match one pattern.
        self.exit(2, f"flowdit: error: {message} (see {self.prog} --help)\n")


# Option types: a bad value is refused by argparse with the flag's name, before any work.


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    v = _finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _non_negative_float(text: str) -> float:
    v = _finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    v = _int(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _non_negative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def _seed(text: str) -> int:
    v = _int(text)
    if not 0 <= v <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"must be in 0..2**63-1, got {text!r}")
    return v


def _solvers(adaptive: bool = True) -> list[str]:
    from ..sampling.sample import ADAPTIVE_METHODS
    from ..sampling.solvers import SOLVERS

    return list(SOLVERS) + (list(ADAPTIVE_METHODS) if adaptive else [])


def _check_solver(name: str, adaptive: bool = True) -> None:
    valid = _solvers(adaptive)
    if name.strip().lower().replace("-", "_") not in valid:
        kind = "" if adaptive else " fixed-step"
        raise ConfigError(f"--solver {name!r}: unknown{kind} solver; valid: {', '.join(valid)}")


def _device(args: argparse.Namespace):
    from ..utils.device import resolve_device

    return resolve_device(args.device)


def _check_writable(path, flag: str) -> Path:
    from ..utils.files import check_writable

    return check_writable(path, flag)


def _parse_classes(text: str | None, num_classes: int, flag: str = "--classes",
                   null_class: int | None = None) -> list[int] | None:
    """Comma-separated class indices in ``0..num_classes-1`` (and the null class
    ``null_class`` where it is allowed)."""
    if text is None:
        return None
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
    allowed = set(range(num_classes)) | ({null_class} if null_class is not None else set())
    bad = [c for c in classes if c not in allowed]
    if bad or not classes:
        null = f", or {null_class} for the null class (unconditional)" if null_class is not None else ""
        raise ConfigError(f"{flag} {text!r}: each class must be in 0..{num_classes - 1}{null}")
    return classes


def _parse_interval(text: str | None):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--guidance-interval must be 'lo,hi' with 0 <= lo < hi <= 1, got {text!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"--guidance-interval must satisfy 0 <= lo < hi <= 1, got {text!r}")
    return lo, hi


def _data_root(args: argparse.Namespace, root: str | None = None) -> str | None:
    """``--data-root`` (or a run's data.root), refused up front where mnist has none."""
    import os

    from ..data import MNIST_ENV

    root = args.data_root or root
    dataset = getattr(args, "dataset", None)
    if dataset == "mnist" and not root and not os.environ.get(MNIST_ENV):
        raise ConfigError(f"--dataset mnist needs the directory of its IDX files: pass --data-root DIR "
                          f"(or set {MNIST_ENV})")
    return root


def command(parent, name: str, **kwargs) -> argparse.ArgumentParser:
    """Add subcommand ``name`` to the subparsers ``parent``; the parsed namespace remembers
    its parser (``args._parser``), so that late errors print that command's usage hint."""
    c = parent.add_parser(name, **kwargs)
    c.set_defaults(_parser=c)
    return c
