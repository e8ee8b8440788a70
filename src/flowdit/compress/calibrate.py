"""Calibration: the inputs each linear layer sees along the model's own sampling trajectories.

A diffusion transformer's activation ranges move with the time ``t``, so post-training
quantization calibrates on the states ``(x_t, t, y)`` the model meets when it samples,
at every step of the solver (conditional and unconditional halves of guidance alike),
not on data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..inference.generate import balanced_labels, generate

__all__ = ["DEFAULT_LAYERS", "LayerStats", "calibrate", "target_linears"]

# The token-wise linears of the transformer blocks: attention and MLP, as LRQ-DiT's
# ``attn|ff`` pattern; the adaLN modulation, embedders and final layer stay in float.
DEFAULT_LAYERS = r"^blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))$"


def target_linears(model: nn.Module, pattern: str = DEFAULT_LAYERS) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` whose qualified name matches ``pattern``."""
    rx = re.compile(pattern)
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.search(n)}
    if not found:
        raise ValueError(f"no linear layer of the model matches {pattern!r}")
    return found


@dataclass
class LayerStats:
    """What calibration records of one layer's input ``x [..., C]``.

    ``absmax [C]``: per-channel max |x| over all calibration tokens (SmoothQuant's
    statistic). ``sq_sum, count``: sum of ``x^2`` and number of entries, giving LRQ-DiT's
    fluctuation ``J = ||X||_F / sqrt(B N C)`` (its eq. 11) over the calibration set.
    ``rows [R, C]``: a fixed-size subset of token rows, for calibrating rotations.
    """

    absmax: torch.Tensor
    sq_sum: float = 0.0
    count: int = 0
    rows: list = field(default_factory=list)

    @property
    def fluctuation(self) -> float:
        return (self.sq_sum / max(self.count, 1)) ** 0.5

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.rows) if self.rows else torch.empty(0, self.absmax.numel())


@torch.no_grad()
def calibrate(model: nn.Module, shape: Sequence[int], num_samples: int = 64, solver: str = "heun",
              steps: int = 16, cfg_scale: float = 1.5, seed: int = 1234, pattern: str = DEFAULT_LAYERS,
              rows_per_call: int = 64, batch_size: int = 64,
              amp_dtype: Optional[torch.dtype] = None) -> dict[str, LayerStats]:
    """Sample ``num_samples`` class-balanced images with the float model and record, through
    forward hooks, the input statistics of every target linear at every model call.

    Returns ``{layer name: LayerStats}``. ``rows_per_call`` token rows are kept per call
    and layer (evenly spaced), for rotation calibration. The seed is not the evaluation's
    (1234 by default), so calibration never sees the noise it is scored on.
    """
    layers = target_linears(model, pattern)
    stats = {n: LayerStats(torch.zeros(m.in_features)) for n, m in layers.items()}

    def hook(name):
        def record(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            s = stats[name]
            s.absmax = torch.maximum(s.absmax, x.abs().amax(0))
            s.sq_sum += float((x * x).sum())
            s.count += x.numel()
            idx = torch.linspace(0, x.shape[0] - 1, min(rows_per_call, x.shape[0])).long()
            s.rows.append(x[idx].clone())
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        labels = balanced_labels(model.num_classes, num_samples)
        generate(model, labels, shape, solver=solver, steps=steps, cfg_scale=cfg_scale, seed=seed,
                 batch_size=batch_size, amp_dtype=amp_dtype)
    finally:
        for h in handles:
            h.remove()
    return stats
