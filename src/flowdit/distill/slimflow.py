"""SlimFlow (Zhu, Liu & Liu, "SlimFlow: Training Smaller One-Step Diffusion Models with
Rectified Flow", ECCV 2024): annealing reflow and flow-guided distillation, so that a
*smaller* student than the teacher becomes a one-step model.

Checked against their public code (github.com/yuanzhi-zhu/SlimFlow, ``reflow/reflow.py``),
which puts noise at t = 0 and data at t = 1 with velocity ``data - noise``; flowdit's time is
``1 - t`` of theirs and its velocity the negative of theirs. Every formula below is in
flowdit's convention, and ``tests/test_distill.py`` compares them with theirs.

1. **Annealing reflow** (sec. 4.2). A smaller student cannot start from the teacher's
   weights, and reflow from scratch on the fixed coupling is hard. So the pair's noise is
   blended with fresh noise, variance-preservingly,

       z = sqrt(1 - b^2) z_pair + b eps,      eps ~ N(0, I) fresh each step,

   with ``b`` annealed from 1 (plain flow matching on the teacher's samples) to 0 (reflow
   on the coupling). Their default (``x0_randomness warmup_N``) is linear,
   ``b = 1 - min(1, step / N)``; ``cos`` and ``exp`` are their other options.
   Data and noise of a pair are flipped horizontally *together* (``h_flip``), which keeps
   the pair a pair of the flipped distributions and doubles the coupling. (Their code flips
   the whole batch with one coin; here each pair has its own coin, the same augmentation
   with less variance.)

2. **Flow-guided distillation** (sec. 4.3). One-step distillation on the pairs, plus a
   term on fresh noise ``z`` whose target is a two-step sample: the student's own one-step
   line to time ``s ~ U(0.2, 0.8)``, then one Euler step of the 2-rectified flow teacher,

       x_s = (1 - s) x0_student + s z,      target = x_s - s v_teacher(x_s, s),

   and the student's one-step sample ``z - v(z, 1)`` regresses ``target`` with the same
   distance, the two terms added with weight 1 each (``teacher_loss_new`` in their code;
   ``x0_student`` carries no gradient into the target). The teacher is the annealed
   2-rectified flow the student is initialised from.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["ANNEAL_SCHEDULES", "GUIDE_TIME_RANGE", "anneal_randomness", "mix_noise", "joint_flip",
           "guide_times", "flow_guided_target"]

ANNEAL_SCHEDULES = ("linear", "cos", "exp")
GUIDE_TIME_RANGE = (0.2, 0.8)  # their t_ = 0.2 + 0.6 u; symmetric, so the same in flowdit's time


def anneal_randomness(step: int, steps: int, schedule: str = "linear") -> float:
    """The blend ``b`` at training ``step`` of annealing reflow over ``steps`` steps
    (SlimFlow code, ``randomness_schedule``): ``linear`` ``1 - min(1, step/steps)``,
    ``cos`` ``(1 + cos(pi min(1, step/steps))) / 2``, ``exp`` ``exp(-step/steps)``.
    ``steps = 0`` means no annealing (``b = 0``)."""
    if schedule not in ANNEAL_SCHEDULES:
        raise ConfigError(f"unknown annealing schedule {schedule!r}; valid: {', '.join(ANNEAL_SCHEDULES)}")
    if steps <= 0:
        return 0.0
    r = min(1.0, step / steps)
    if schedule == "linear":
        return 1.0 - r
    if schedule == "cos":
        return 0.5 * (1.0 + math.cos(math.pi * r))
    return math.exp(-step / steps)


def mix_noise(z_pair: Tensor, fresh: Tensor, b: float | Tensor) -> Tensor:
    """``sqrt(1 - b^2) z_pair + b fresh`` for ``z_pair, fresh [B, ...]`` and ``b`` in
    ``[0, 1]`` (scalar or ``[B]``): unit variance for independent standard normals;
    ``b = 0`` returns the pair's noise, ``b = 1`` the fresh noise."""
    b = torch.as_tensor(b, dtype=z_pair.dtype, device=z_pair.device)
    if b.dim() == 1:
        b = b.reshape(-1, *([1] * (z_pair.dim() - 1)))
    if bool(((b < 0) | (b > 1)).any()):
        raise ConfigError(f"noise blend b must lie in [0, 1], got {b.flatten().tolist()[:4]}")
    return torch.sqrt(1 - b * b) * z_pair + b * fresh


def joint_flip(x0: Tensor, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Flip ``x0`` and ``z`` ``[B, C, H, W]`` left-right together where ``mask [B]`` is true."""
    m = mask.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.device)
    return torch.where(m, x0.flip(-1), x0), torch.where(m, z.flip(-1), z)


def guide_times(u: Tensor) -> Tensor:
    """``s = 0.2 + 0.6 u`` ``[B]`` for uniforms ``u [B]``: SlimFlow's intermediate times."""
    lo, hi = GUIDE_TIME_RANGE
    return lo + (hi - lo) * u


@torch.no_grad()
def flow_guided_target(teacher: Callable[[Tensor, Tensor], Tensor], z: Tensor, x0_student: Tensor,
                       s: Tensor) -> Tensor:
    """The two-step target of flow-guided distillation (see the module docstring):
    ``x_s = (1 - s) x0_student + s z``, then ``x_s - s v_teacher(x_s, s)``.

    Args:
        teacher: velocity ``(x [B, ...], t [B]) -> v``.
        z: fresh noise ``[B, ...]`` (t = 1); ``x0_student``: the student's one-step sample
            from it, ``[B, ...]`` (detached here); ``s``: times ``[B]``.
    """
    sv = s.to(z.dtype).reshape(-1, *([1] * (z.dim() - 1)))
    x_s = (1 - sv) * x0_student.detach() + sv * z
    return x_s - sv * teacher(x_s, s).to(z.dtype)
