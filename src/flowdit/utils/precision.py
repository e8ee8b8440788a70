"""One way to enter mixed precision, shared by training, sampling, inversion and pair generation."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch


def autocast(device_type: str, dtype: Optional[torch.dtype]) -> AbstractContextManager:
    """``torch.autocast(device_type, dtype)``, or a no-op context when ``dtype`` is ``None`` (fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
