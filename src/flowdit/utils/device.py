"""The device a command runs on, checked before any work."""

from __future__ import annotations

from typing import Optional

import torch

from flowdit.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(text: Optional[str], flag: str = "--device") -> torch.device:
    """The ``torch.device`` for a ``--device`` value (``None``: CUDA when available, else
    the CPU); an unknown name, or a device this machine does not have, raises
    :class:`ConfigError` naming ``flag``."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{flag} {text!r}: not a device; use cpu or cuda (cuda:N for one GPU)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"{flag} {text}: CUDA is not available on this machine ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{flag} {text}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{flag} {text}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ConfigError(f"{flag} {text}: flowdit runs on cpu or cuda, got device type {dev.type!r}")
    return dev
