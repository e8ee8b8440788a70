"""Sampling time grids: decreasing ``t_0 = 1 > t_1 > ... > t_N = 0`` (t = 1 noise).

Grids are computed in float64 and only then cast, so ``t_0`` and ``t_N`` are exactly
1 and 0 and consecutive steps never collapse. Reverse a grid (``grid.flip(0)``) to
integrate data -> noise (inversion).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from flowdit.core.timesteps import shift_time
from flowdit.errors import ConfigError

__all__ = ["uniform", "shifted", "SCHEDULES", "build_schedule"]


def _check_steps(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"number of sampling steps must be a positive int, got steps={n!r}")


def uniform(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Evenly spaced grid ``t_i = 1 - i / n``, shape ``[n + 1]`` (Liu et al. 2022)."""
    _check_steps(n)
    return torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).to(dtype)


def shifted(n: int, shift: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Uniform grid passed through the SD3 shift ``t -> shift t / (1 + (shift - 1) t)``.

    Uses ``flowdit.core.timesteps.shift_time``, the same function the training time
    samplers use, so a model trained with ``shift=s`` is sampled on a matching grid
    (Esser et al. 2024, eq. 23). ``shift > 1`` spends more steps near the noise end.
    Shape ``[n + 1]``.
    """
    return shift_time(uniform(n, dtype=torch.float64), shift).to(dtype)


SCHEDULES: dict[str, Callable[..., Tensor]] = {"uniform": uniform, "shifted": shifted}


def build_schedule(name: str, n: int, dtype: torch.dtype = torch.float32, **kw) -> Tensor:
    """Build a named schedule: ``build_schedule("shifted", 28, shift=3.0)`` -> ``[29]``."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    try:
        return SCHEDULES[name](n, dtype=dtype, **kw)
    except TypeError as err:
        raise ConfigError(f"bad options {kw!r} for schedule {name!r}: {err}") from None
