"""Helpers of the typed configuration sections, shared by :mod:`flowdit.train.config` and
the sections the training objectives bring (:mod:`flowdit.train.objectives`).

Kept apart from ``config.py`` so that an objective's module can define its section without
importing the run configuration, which is itself assembled from the objectives' sections.
"""

from __future__ import annotations

import os
from dataclasses import field
from typing import Any, Optional

from ..errors import ConfigError

__all__ = ["key", "positive", "non_negative", "absolute_path"]


def key(default: Any = None, help: str = "", factory: Any = None):
    """A config field with its one-line help (``flowdit train --list-keys``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def positive(section: str, obj: Any, *keys: str) -> None:
    """Refuse a non-positive value of any of ``keys`` of ``obj`` (``None`` passes), naming
    ``section.key``."""
    for k in keys:
        v = getattr(obj, k)
        if v is not None and not v > 0:
            raise ConfigError(f"{section}.{k} must be positive, got {v}")


def non_negative(section: str, obj: Any, *keys: str) -> None:
    """Refuse a negative value of any of ``keys`` of ``obj`` (``None`` passes), naming
    ``section.key``."""
    for k in keys:
        v = getattr(obj, k)
        if v is not None and v < 0:
            raise ConfigError(f"{section}.{k} must be >= 0, got {v}")


def absolute_path(p: Optional[str]) -> Optional[str]:
    """``p`` made absolute against the working directory (``~`` expanded); ``None`` stays."""
    return None if p is None else os.path.abspath(os.path.expanduser(p))
