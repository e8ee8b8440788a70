"""SRA: self-representation alignment (Jiang et al., "No Other Representation Component Is
Needed: Diffusion Transformers Can Provide Representation Guidance by Themselves", 2025;
code vvvvvjdy/SRA, ``SiT-SRA/loss.py`` ``SRALoss`` and ``SiT-SRA/train.py``).

The student's output after an early block ``s`` goes through a training-only head
(``SimpleHead``: ``Linear(D, 2D)``, then ``SiLU``, ``Linear(2D, D)``) and regresses the
EMA teacher's raw output after a later block ``k`` at a *lower* noise level, on the same
image, noise and (dropped) label:

    t_T = clip(t - t_max u, 0, 1),   u ~ U(0, 1),
    L = L_velocity + w(step) * smooth_l1_beta(head(h_s(x_t, t)), h^EMA_k(x_{t_T}, t_T)).

The reference's path is ``x_t = (1 - t) x0 + t eps`` with ``t = 0`` data, flowdit's own
convention, so its ``t - t_max u`` needs no conversion. ``smooth_l1_beta`` is
``torch.nn.functional.smooth_l1_loss(beta=0.05)``, the mean over every element
(``sra.loss=sml1``, the paper's; ``l1`` and ``l2`` as in ``Simpleloss``). The weight is
0.2 (``2 * 0.1``), decayed tenfold every ``sra.decay_every`` steps after
``sra.decay_start`` (the code counts epochs: from epoch 150 by 10x per 1,000 epochs at
256 px; off by default here, where runs are short).

The teacher is the trainer's EMA (decay ``optim.ema_decay``), run in no-grad up to block
``k`` only (its later blocks do not change ``h_k``): one extra partial forward per step.
Blocks scaled to depth from the SiT-B defaults 4 and 8 of 12 (``round(4 depth / 12)``,
``round(8 depth / 12)``: 2 and 4 of DiT-mnist's 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.path import interpolate
from ...errors import ConfigError
from ...utils.precision import autocast
from ..sections import key
from .base import FIRST_OBJECTIVE_STREAM, Extras, StepDraws, TrainingObjective, Velocity
from .features import block_outputs, check_blocks, inner_velocity_objective, scaled_block, tapped_velocity

__all__ = ["SraSection", "SRA", "SRA_STREAM", "build_sra_head", "sra_teacher_times", "sra_alignment_loss",
           "sra_weight"]

# The stream of the teacher's time offsets u (apart from SlimFlow's, which is stream 3).
SRA_STREAM = FIRST_OBJECTIVE_STREAM + 1


@dataclass
class SraSection:
    """SRA's options (``flow.objective=sra``)."""

    student_block: Optional[int] = key(None, "student block aligned, from 1 (null: round(4 depth / 12), SiT-B's 4 of 12)")
    teacher_block: Optional[int] = key(None, "EMA teacher block aligned to, from 1 (null: round(8 depth / 12))")
    t_max: float = key(0.2, "the teacher's time is t - t_max u, u ~ U(0, 1), clipped to [0, 1]")
    weight: float = key(0.2, "weight of the alignment term (the reference's 2 * 0.1 for smooth L1)")
    loss: Literal["sml1", "l1", "l2"] = key("sml1", "distance: smooth L1 (beta 0.05, the paper's), l1 or l2")
    decay_start: Optional[int] = key(None, "step after which the weight decays tenfold every decay_every steps "
                                           "(null: constant)")
    decay_every: int = key(1000, "steps per tenfold decay of the weight after decay_start")

    def validate(self) -> None:
        for k in ("student_block", "teacher_block"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise ConfigError(f"sra.{k} must be >= 1, got {v}")
        if not 0 <= self.t_max <= 1:
            raise ConfigError(f"sra.t_max must be in [0, 1], got {self.t_max}")
        if self.weight < 0:
            raise ConfigError(f"sra.weight must be >= 0, got {self.weight}")
        if self.decay_start is not None and self.decay_start < 0:
            raise ConfigError(f"sra.decay_start must be >= 0, got {self.decay_start}")
        if self.decay_every < 1:
            raise ConfigError(f"sra.decay_every must be >= 1, got {self.decay_every}")


def build_sra_head(hidden_size: int) -> nn.Sequential:
    """SRA's ``SimpleHead(D, D)``: ``Linear(D, 2D)``, ``SiLU``, ``Linear(2D, D)``, with
    Xavier-uniform weights and zero biases (SiT's ``initialize_weights`` reaches it)."""
    head = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.SiLU(), nn.Linear(2 * hidden_size, hidden_size))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return head


def sra_teacher_times(t: Tensor, u: Tensor, t_max: float) -> Tensor:
    """``clip(t - t_max u, 0, 1)`` ``[B]``: the teacher sees a less noisy point of the same path."""
    return (t - t_max * u).clamp(0.0, 1.0)


def sra_alignment_loss(student: Tensor, teacher: Tensor, kind: str = "sml1") -> Tensor:
    """The mean over all elements of ``[B, N, D]`` tensors of smooth L1 (beta 0.05), L1 or
    squared error, in float32 (``Simpleloss.forward``)."""
    a, b = student.float(), teacher.float()
    if kind == "sml1":
        return F.smooth_l1_loss(a, b, beta=0.05)
    if kind == "l1":
        return F.l1_loss(a, b)
    if kind == "l2":
        return F.mse_loss(a, b)
    raise ValueError(f"unknown SRA loss {kind!r}")


def sra_weight(step: int, weight: float, decay_start: Optional[int], decay_every: int) -> float:
    """``weight`` until ``decay_start``, then ``weight * 0.1 ** ((step - decay_start) / decay_every)``
    (the reference's epoch rule with steps for epochs)."""
    if decay_start is None or step <= decay_start:
        return weight
    return weight * 0.1 ** ((step - decay_start) / decay_every)


class SRA(TrainingObjective):
    """SRA (module docstring) around ``inner``, the objective ``flow.objective=auto`` would
    choose (flow matching).

    Extras: ``sra_u [G]``, the teacher's time offsets (stream :data:`SRA_STREAM`).
    Trainable: the head (checkpointed as ``heads``)."""

    name = "sra"
    sections = {"sra": SraSection}

    def __init__(self, cfg, dataset, device, amp_dtype):
        super().__init__(cfg, dataset, device, amp_dtype)
        self.inner: TrainingObjective = inner_velocity_objective(self, cfg, dataset, device, amp_dtype)
        self.terms: dict[str, Tensor] = {}
        self.head: Optional[nn.Module] = None
        self.weight_now = cfg.sra.weight

    def bind(self, model: nn.Module, ema: nn.Module) -> None:
        """Choose the two blocks and build the head; the EMA is the teacher."""
        depth = len(getattr(model, "blocks", ()))
        s = self.cfg.sra
        self.student_block = s.student_block if s.student_block is not None else scaled_block(4, 12, depth)
        self.teacher_block = s.teacher_block if s.teacher_block is not None else scaled_block(8, 12, depth)
        check_blocks(model, {"sra.student_block": self.student_block, "sra.teacher_block": self.teacher_block})
        self.model, self.teacher = model, ema
        D = model.config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.train.seed)
            self.head = build_sra_head(D)

    def trainable(self) -> Optional[nn.Module]:
        return self.head

    def draw(self, draws: StepDraws, generator: torch.Generator) -> Extras:
        """The inner objective's draws, then ``sra_u [G]`` from :data:`SRA_STREAM`; sets this
        step's weight."""
        extras = dict(self.inner.draw(draws, generator))
        extras["sra_u"] = torch.rand(draws.size, generator=draws.stream(SRA_STREAM))
        s = self.cfg.sra
        self.weight_now = sra_weight(draws.step, s.weight, s.decay_start, s.decay_every)
        return extras

    def loss(self, velocity: Velocity, x0: Tensor, eps: Tensor, t: Tensor, y: Tensor, extras: Extras) -> Tensor:
        """Denoising loss plus the weighted alignment of the student's head output to the
        EMA teacher's later block at the earlier time."""
        xt = interpolate(x0, eps, t)
        v, feats = tapped_velocity(velocity, self.model, xt, t, y, [self.student_block])
        with autocast(self.device.type, self.amp_dtype):
            student = self.head(feats[self.student_block])
            t_teacher = sra_teacher_times(t, extras["sra_u"], self.cfg.sra.t_max)
            teacher = block_outputs(self.teacher, interpolate(x0, eps, t_teacher), t_teacher, y,
                                    [self.teacher_block])[self.teacher_block]
        flow = self.inner.velocity_loss(v, xt, x0, eps, t)
        align = sra_alignment_loss(student, teacher, self.cfg.sra.loss)
        self.terms = {"flow": flow.detach(), "sra": align.detach()}
        return flow + self.weight_now * align
