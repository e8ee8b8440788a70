"""Conditions and grids shared by the editing methods: class labels or text conditions
for ``N`` images, sliced into batches, and a sampling grid given or built."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from flowdit.errors import ConfigError

from .inversion import sampling_grid

__all__ = ["Cond", "check_condition", "take_rows", "decreasing_grid"]

Cond = Any  # class indices [N], or a dict of [N, ...] tensors (a text condition)


def check_condition(name: str, cond: Optional[Cond], n: int) -> None:
    """A condition for ``n`` images: class indices ``[n]``, a dict of ``[n, ...]`` tensors
    (a text condition), or ``None``."""
    if cond is None:
        return
    rows = {k: v.shape[0] if isinstance(v, Tensor) and v.dim() else None for k, v in cond.items()} \
        if isinstance(cond, dict) else {"": cond.shape[0] if isinstance(cond, Tensor) and cond.dim() == 1 else None}
    bad = [k for k, r in rows.items() if r != n]
    if bad:
        what = "labels [N]" if not isinstance(cond, dict) else f"condition tensors [N, ...] (not {', '.join(bad)})"
        raise ConfigError(f"{name} must be {what} with N = {n} images")


def take_rows(cond: Optional[Cond], lo: int, hi: int, device: torch.device) -> Optional[Cond]:
    """Rows ``lo:hi`` of a condition (each tensor of a dict), on ``device``."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[lo:hi].to(device) for k, v in cond.items()}
    return cond[lo:hi].to(device)


def decreasing_grid(grid: Optional[Tensor], steps: int, shift: float = 1.0) -> Tensor:
    """The sampling grid ``[steps + 1]`` (float64, 1 -> 0): ``grid`` checked (a pipeline's
    own), or ``sampling_grid(steps, shift)`` when it is ``None``."""
    if grid is None:
        return sampling_grid(steps, shift)
    out = torch.as_tensor(grid, dtype=torch.float64).flatten().cpu()
    if out.numel() != steps + 1 or not bool((out.diff() < 0).all()):
        raise ConfigError(f"grid must be a decreasing time grid of steps + 1 = {steps + 1} times")
    return out
