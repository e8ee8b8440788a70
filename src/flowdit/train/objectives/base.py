"""The protocol of a training objective: what the trainer asks of it, and when.

Conventions (docs/conventions.md): t = 0 is data, t = 1 noise, ``x_t = (1 - t) x0 + t eps``
and the velocity ``v = eps - x0``. Shapes: ``G`` the global batch of a step, ``B`` this
process's micro-batch, images ``[., C, H, W]``.

One optimizer step of :class:`flowdit.train.trainer.Trainer` calls, in this order:

1. :meth:`TrainingObjective.draw` once, with the trainer's own draws of the *global* batch
   (:class:`StepDraws`: noise ``eps [G, C, H, W]``, times ``t [G]`` after ``flow.shift``) and
   the step's noise generator, positioned after the trainer's draws (noise, times, label
   dropout). The objective may replace ``draws.t`` and returns its extra per-sample draws
   (``Extras``: tensors with leading dimension ``G``), drawn from that generator after the
   trainer's, or from a stream of its own (:meth:`StepDraws.stream`). So the draws depend
   neither on the number of processes nor on a resume.
2. :meth:`TrainingObjective.couple` on this process's share, on the CPU: the data and noise
   ends of each sample (a coupling pair on ``data.pairs``) may be changed here, given the
   step's fresh noise and the share of the extras.
3. ``objective(velocity, x0, eps, t, y, extras)`` (:meth:`TrainingObjective.loss`) once per
   micro-batch, the extras sliced to it and on the device; a scalar float32 loss, of which
   the trainer takes the gradient.

An objective is built once per run, after the model, with the run config, the data set,
the device and the autocast dtype; frozen helper networks (a perceptual distance, a
teacher) are loaded then. The trainer then calls :meth:`TrainingObjective.bind` with the
model being trained and its EMA copy, before it builds the optimizer: an objective that
needs the model's hidden states (representation alignment) or its EMA (a self-teacher)
keeps them there, and one with trainable training-only modules (a projection head) builds
them there and returns them from :meth:`TrainingObjective.trainable`. Those modules are
optimized with the model (same optimizer, clipped together), averaged over processes,
saved in every checkpoint under ``heads`` and restored on resume; sampling never sees them.

The ``velocity`` callable takes an optional step context, ``velocity(x, t, y, ctx=ctx)``:
its block hooks see the blocks of the very forward pass whose gradient is taken
(:mod:`flowdit.train.objectives.features` reads block outputs so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
from torch import Tensor

from ...core.path import interpolate
from ...errors import FlowditError
from ...utils.seeding import seeded_generator

if TYPE_CHECKING:
    from ...distill.perceptual import PerceptualFn
    from ..config import RunConfig

__all__ = ["Velocity", "Extras", "StepDraws", "TrainingObjective", "FIRST_OBJECTIVE_STREAM", "build_perceptual"]

Velocity = Callable[..., Tensor]
"""``velocity(x [B, C, H, W], t [B], y [B], ctx=None) -> v [B, C, H, W]``: the model being
trained, under the run's autocast, float32 output; ``ctx`` an optional
:class:`flowdit.core.hooks.StepContext` whose hooks act inside that forward pass."""

Extras = dict[str, Tensor]
"""An objective's extra per-sample draws of one step, by name; leading dimension the batch."""

# Streams 1 (data order) and 2 (noise, times, label dropout) are the trainer's; an objective
# that needs a stream of its own takes one from this number on.
FIRST_OBJECTIVE_STREAM = 3


@dataclass
class StepDraws:
    """What the trainer drew for the global batch of step ``step``.

    ``eps [G, C, H, W]``: fresh standard normal noise; ``t [G]``: times from
    ``flow.time_sampler`` after ``flow.shift`` (an objective's :meth:`TrainingObjective.draw`
    may replace it, e.g. by a grid); ``seed``: ``train.seed``; ``idx [G]``: the data
    indices of the global batch (into the data set, or into ``data.pairs`` on pairs), so
    that an objective can look up per-item targets it computed once (REPA's encoder
    features).
    """

    step: int
    eps: Tensor
    t: Tensor
    seed: int
    idx: Optional[Tensor] = None

    @property
    def size(self) -> int:
        """The global batch size ``G``."""
        return len(self.t)

    def stream(self, k: int) -> torch.Generator:
        """The generator of stream ``k`` (``>= FIRST_OBJECTIVE_STREAM``) at this step, seeded by
        ``(seed, k, step)``: independent of every other stream and step."""
        if k < FIRST_OBJECTIVE_STREAM:
            raise ValueError(f"streams below {FIRST_OBJECTIVE_STREAM} are the trainer's, got {k}")
        return seeded_generator(self.seed, k, self.step)


class TrainingObjective:
    """Base class of the training objectives (see the module docstring for the order of calls).

    A subclass sets ``name`` and implements :meth:`velocity_loss` (the loss of the model's
    velocity at the straight-path point ``x_t``) or, for full control over the model calls,
    :meth:`loss`. Optional hooks: :meth:`draw`, :meth:`couple`; class methods
    :meth:`selected_by` (the automatic choice, ``flow.objective=auto``) and
    :meth:`check_config` (checks across sections when the config is read).

    ``sections``: the config sections the objective adds to the run config, ``{key:
    dataclass}`` (e.g. ``{"distill": DistillSection}``); they become ``RunConfig`` fields
    after the core ones, with YAML, ``key=value`` overrides, validation and
    ``--list-keys`` like every other section. Sections of the same key must be the same
    class. Every objective also reads the core sections, ``flow`` in particular.
    """

    name: ClassVar[str] = ""
    sections: ClassVar[dict[str, type]] = {}

    def __init__(self, cfg: "RunConfig", dataset, device: torch.device, amp_dtype: Optional[torch.dtype]):
        self.cfg, self.dataset, self.device, self.amp_dtype = cfg, dataset, device, amp_dtype

    # -- the model it trains (called once by the trainer, before the optimizer exists) -----

    def bind(self, model: torch.nn.Module, ema: torch.nn.Module) -> None:
        """Called once with the model being trained (the bare module, not its DDP or compiled
        wrapper) and its EMA copy, after both exist and before the optimizer is built.
        Default: nothing. Build training-only modules here (:meth:`trainable`)."""

    def trainable(self) -> Optional[torch.nn.Module]:
        """The objective's own trainable modules (a projection head), or ``None``. The
        trainer optimizes their parameters with the model's, saves their state as the
        checkpoint's ``heads`` tensors and restores it on resume."""
        return None

    # -- selection and checks (class level: before anything is built) -------------------

    @classmethod
    def selected_by(cls, cfg: "RunConfig") -> bool:
        """Whether ``flow.objective=auto`` chooses this objective for ``cfg``; the last
        registered objective that says yes is chosen (:func:`select_objective`). Default: only
        when named."""
        return False

    @classmethod
    def check_config(cls, cfg: "RunConfig") -> None:
        """Refuse combinations of keys this objective's options do not allow (raise
        :class:`flowdit.errors.ConfigError` naming the keys); called for every registered
        objective when a run config is validated, whichever is selected."""

    # -- per step ------------------------------------------------------------------------

    def draw(self, draws: StepDraws, generator: torch.Generator) -> Extras:
        """Extra draws for the global batch of one step (leading dimension ``draws.size``),
        from ``generator`` (the step's noise stream, after the trainer's draws) or from
        ``draws.stream(k)``; may set ``draws.t``. Default: none."""
        return {}

    def couple(self, step: int, x0: Tensor, eps: Tensor, fresh: Tensor, extras: Extras) -> tuple[Tensor, Tensor]:
        """The data and noise ends ``(x0, eps)`` ``[B, C, H, W]`` this process trains on at
        ``step``, from the batch's ``x0, eps`` (a coupling pair on ``data.pairs``, else data
        and the fresh noise), the step's fresh noise ``fresh`` and this share of the extras,
        all on the CPU. Default: unchanged."""
        return x0, eps

    def loss(self, velocity: Velocity, x0: Tensor, eps: Tensor, t: Tensor, y: Tensor, extras: Extras) -> Tensor:
        """The scalar loss of one micro-batch: ``x0, eps [B, C, H, W]`` the data and noise
        ends, ``t, y [B]`` times and labels (the null class where dropped), ``extras`` this
        micro-batch's share of :meth:`draw`. Default: one model call at
        ``x_t = (1 - t) x0 + t eps``, then :meth:`velocity_loss`."""
        xt = interpolate(x0, eps, t)
        return self.velocity_loss(velocity(xt, t, y), xt, x0, eps, t)

    def velocity_loss(self, v: Tensor, xt: Tensor, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The scalar loss of the predicted velocity ``v [B, C, H, W]`` at ``(x_t, t)`` of the
        straight path from ``x0`` to ``eps``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither loss nor velocity_loss")

    def __call__(self, velocity: Velocity, x0: Tensor, eps: Tensor, t: Tensor, y: Tensor,
                 extras: Optional[Extras] = None) -> Tensor:
        """:meth:`loss` (what the trainer calls)."""
        return self.loss(velocity, x0, eps, t, y, extras if extras is not None else {})


def build_perceptual(name: str, dataset: str, device: torch.device) -> "PerceptualFn":
    """The perceptual distance ``flow.perceptual`` names, on ``device``: ``guide`` (the
    data set's shipped guide network, :class:`flowdit.distill.FeatureDistance`, an
    LPIPS-style distance on its features) or ``lpips``. ``(a, b) [B, C, H, W] -> [B]``. The
    evaluator network is never used: it scores the results."""
    from ...distill.perceptual import FeatureDistance, LPIPSDistance

    if name == "guide":
        from ...eval.evaluator import load_classifier

        net, _ = load_classifier(dataset, "guide")
        return FeatureDistance(net).to(device)
    if name == "lpips":
        return LPIPSDistance().to(device)
    raise FlowditError(f"unknown perceptual network {name!r}; valid: guide, lpips (never the evaluator)")
