"""Straightness and transport cost of a flow (Liu, Gong & Liu, "Flow Straight and Fast",
ICLR 2023, sec. 2.3 and eq. (5)).

In flowdit's convention (t = 1 noise, t = 0 data, ``dx/dt = v``) a trajectory starts at the
noise ``z_1`` and ends at the generated ``z_0``. Its straight chord has constant velocity
``z_1 - z_0``, so

    S = int_0^1 E || (z_1 - z_0) - v(z_t, t) ||^2 dt

is zero exactly when every trajectory is a straight line travelled at constant speed, and
one Euler step is then exact. The transport cost of the coupling is ``E ||z_1 - z_0||^2``.
Both are reported per dimension (the squared norm divided by the number of elements of one
sample), so that data sets of different sizes compare; multiply by D for Liu et al.'s sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampling.sample import sample
from ..sampling.solvers import ModelFn

__all__ = ["FlowStraightness", "straightness", "transport_cost"]


@dataclass
class FlowStraightness:
    """``straightness``: S per dimension; ``transport_cost``: ``E||z_1 - z_0||^2`` per
    dimension; ``per_sample``: S of each trajectory ``[B]``; ``nfe``: evaluations used."""

    straightness: float
    transport_cost: float
    per_sample: Tensor
    nfe: int


def transport_cost(z1: Tensor, z0: Tensor) -> float:
    """Mean squared distance per dimension between paired noise ``z1`` and data ``z0`` ``[B, ...]``."""
    if z1.shape != z0.shape:
        raise ValueError(f"z1 {tuple(z1.shape)} and z0 {tuple(z0.shape)} must have the same shape")
    return float((z1.float() - z0.float()).pow(2).flatten(1).mean(1).mean())


@torch.no_grad()
def straightness(model_fn: ModelFn, noise: Tensor, solver: str = "euler", steps: int = 64) -> FlowStraightness:
    """Straightness ``S`` of the flow ``model_fn`` along its own trajectories from ``noise``.

    The trajectory is integrated with ``solver`` on a uniform grid of ``steps`` steps; the
    velocity is then evaluated at every grid state (``steps + 1`` more evaluations, so the
    measure does not depend on which points a solver happened to evaluate) and the time
    integral is taken with the trapezoidal rule.

    Args:
        model_fn: velocity ``(x [B, ...], t [B]) -> v [B, ...]``.
        noise: starting states ``z_1``, ``[B, ...]``.
    """
    res = sample(model_fn, noise, solver=solver, steps=steps, schedule="uniform", return_trajectory=True)
    z1, z0 = noise.float(), res.x.float()
    chord = z1 - z0
    ts = res.times.tolist()
    dev = []
    for x, t in zip(res.trajectory, ts):
        v = model_fn(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)).float()
        dev.append((chord - v).pow(2).flatten(1).mean(1))
    dt = torch.tensor([abs(ts[i] - ts[i + 1]) for i in range(len(ts) - 1)], dtype=torch.float32)
    dev = torch.stack(dev)  # [steps + 1, B]
    per_sample = (0.5 * (dev[:-1] + dev[1:]) * dt[:, None].to(dev.device)).sum(0)
    return FlowStraightness(float(per_sample.mean()), transport_cost(z1, z0), per_sample.cpu(),
                            res.nfe + len(ts))
