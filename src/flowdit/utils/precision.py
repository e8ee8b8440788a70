"""One way to choose and enter mixed precision, shared by training, sampling, inversion and
pair generation."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch


def autocast(device_type: str, dtype: Optional[torch.dtype]) -> AbstractContextManager:
    """``torch.autocast(device_type, dtype)``, or a no-op context when ``dtype`` is ``None`` (fp32)."""
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for a precision setting (``None``: plain fp32).

    ``auto`` picks bf16 where the hardware runs it fast (CUDA with bf16, or a CPU with
    AVX512-BF16/AMX), fp32 elsewhere. Master weights stay fp32 in every case.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None
