"""FlowChef (Patel et al. 2024, "Steering Rectified Flow Models in the Vector Field for
Controlled Image Generation", arXiv 2412.00100): gradient-free steering of the sampling
ODE for inverse problems and classifier guidance, one model evaluation per step.

At each step from ``t`` to ``t + h`` (``h < 0``):

    v      = v_theta(x_t, t)                  (no graph: the model runs under no_grad)
    x0_hat = x_t - t v                        (the model's clean estimate)
    x_t   <- x_t - lr * grad_{x_t} L(x0_hat),  L = 1/2 sum M (A x0_hat - y)^2
    x_t+h  = x_t + h v                        (Euler, with the same v)

The gradient is taken with ``v`` frozen, so ``d x0_hat / d x_t = I`` and no backward pass
goes through the model; this is the paper's central approximation (on nearly straight
flows the Jacobian of ``v`` is small, so steering ``x_t`` like ``x0_hat`` loses little).
For a linear operator the gradient is ``A^T M (A x0_hat - y)``, computed with the
operator's adjoint. ``lr = step_size / ||A||^2``: with ``step_size = 1`` the update puts
``x0_hat`` exactly on the measurement set for inpainting and average-pool super-resolution.

As in the authors' code (FlowChef/FlowChef, ``inverseproblems/pixel_models/rfpp/
generate_inverseproblems_flowchef.py``, ``sample_ode_generative``: ``if i < N - 1``), the
last step, the one that lands on ``t = 0``, is a plain Euler step: its result *is*
``x0_hat``, and steering it would only move the output itself. ``guide_last_step=True``
steers that step too (flowdit's own variant: the output is then projected onto the
measurements when ``step_size = 1``).

The reference takes ``z <- z - gradient_scale * grad mean(M (A x0_hat - y)^2)``, a mean
over *every* element of the measurement batch, so its gradient is
``2 / numel(y) * A^T M (A x0_hat - y)`` and its step depends on the batch size. The two
parameters are related by ``step_size = 2 * gradient_scale * ||A||^2 / numel(y)``
(``numel(y)`` counts the batch); ``FlowChefSolver.from_gradient_scale`` takes the
reference's parameter. For flowdit's operators ``numel(y) / ||A||^2 = numel(x)``, the
element count of the image batch, so ``step_size = 2 * gradient_scale / numel(x)``: the
reference's ``gradient_scale = 500`` on one 3 x 64 x 64 image is ``step_size = 0.081``;
flowdit's default ``step_size = 1`` on one 1 x 28 x 28 image is ``gradient_scale = 392``.

Classifier guidance replaces ``L`` by the cross-entropy of a classifier on ``x0_hat``;
only that classifier is differentiated (use the data set's *guide* network: the
evaluator scores the result and must not steer it).

Baseline (``ReplacementSolver``): after each Euler step, the measured part of ``x_t`` is
replaced by the measurement carried to time ``t`` along the straight path,
``y_t = (1 - t) y + t A z`` (``z`` the starting noise): ``x_t <- x_t + A^+ (y_t - A x_t)``
(for inpainting: keep known pixels, re-noised; for super-resolution: ILVR-style low-pass
replacement).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flowdit.errors import ConfigError
from flowdit.inference.velocity import model_velocity
from flowdit.sampling.sample import SampleResult, sample
from flowdit.sampling.solvers import Solver, call_velocity

from .inversion import sampling_grid
from .operators import Inpaint, LinearOperator

__all__ = ["FlowChefSolver", "ClassifierGuidanceSolver", "ReplacementSolver", "restore", "restore_images",
           "classifier_guided_sample", "RESTORE_METHODS"]

RESTORE_METHODS = ("flowchef", "baseline", "unguided")


class FlowChefSolver(Solver):
    """One FlowChef step (module docstring): 1 NFE, Euler with a data-fidelity correction.

    Args:
        operator: the known linear ``A``; ``y``: the measurement ``A x + noise``, ``[B, ...]``.
        step_size: ``lr * ||A||^2``; 1 projects ``x0_hat`` onto ``A x = y`` for inpainting and SR.
            The reference's ``gradient_scale`` is ``step_size * numel(y) / (2 ||A||^2)``
            (``from_gradient_scale``).
        mask: optional measurement-space weights ``M`` (0/1), broadcastable to ``y``.
        guide_last_step: also steer the step that lands on ``t = 0`` (the reference does not).
    """

    name = "flowchef"
    nfe_per_step = 1
    order = 1

    def __init__(self, operator: LinearOperator, y: Tensor, step_size: float = 1.0, mask: Optional[Tensor] = None,
                 guide_last_step: bool = False):
        if not step_size >= 0:
            raise ConfigError(f"FlowChef step_size must be >= 0, got {step_size}")
        self.op, self.y, self.mask = operator, y, mask
        self.step_size = float(step_size)
        self.lr = step_size / operator.norm_sq
        self.guide_last_step = bool(guide_last_step)

    @classmethod
    def from_gradient_scale(cls, operator: LinearOperator, y: Tensor, gradient_scale: float,
                            mask: Optional[Tensor] = None, guide_last_step: bool = False) -> "FlowChefSolver":
        """The solver with the reference's ``gradient_scale`` (its loss is a mean over all
        ``numel(y)`` elements, batch included): ``step_size = 2 gradient_scale ||A||^2 / numel(y)``."""
        if not gradient_scale >= 0:
            raise ConfigError(f"FlowChef gradient_scale must be >= 0, got {gradient_scale}")
        return cls(operator, y, 2.0 * gradient_scale * operator.norm_sq / y.numel(), mask, guide_last_step)

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        v = call_velocity(model_fn, x, t_cur).detach()
        if t_next > 0 or self.guide_last_step:
            x0_hat = x - t_cur * v
            r = self.op.forward(x0_hat) - self.y
            if self.mask is not None:
                r = r * self.mask
            x = x - self.lr * self.op.adjoint(r)
        return x + (t_next - t_cur) * v, state


class ClassifierGuidanceSolver(Solver):
    """FlowChef classifier guidance: ``x_t <- x_t - scale * grad CE(classifier(x0_hat), target)``,
    then Euler with the same ``v``; the gradient runs through ``classifier`` only.

    ``classifier(x [B, C, H, W]) -> logits [B, K]``; ``target [B]`` class indices.
    """

    name = "flowchef_cg"
    nfe_per_step = 1
    order = 1

    def __init__(self, classifier: torch.nn.Module, target: Tensor, scale: float = 1.0):
        if type(classifier).__name__ == "EvaluatorNet":
            raise ConfigError("classifier guidance must not use the evaluator network (it scores the results); "
                              "use the data set's guide network")
        self.net, self.target, self.scale = classifier, target, float(scale)

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        v = call_velocity(model_fn, x, t_cur).detach()
        with torch.enable_grad():
            x0_hat = (x.detach() - t_cur * v).requires_grad_(True)
            loss = F.cross_entropy(self.net(x0_hat.float()), self.target, reduction="sum")
            (g,) = torch.autograd.grad(loss, x0_hat)
        x = x.detach() - self.scale * g.to(x.dtype)
        return x + (t_next - t_cur) * v, state


class ReplacementSolver(Solver):
    """The replacement baseline (module docstring): Euler, then ``x <- x + A^+ (y_t - A x)``.

    Needs an operator with an exact pseudo-inverse (inpainting, super-resolution)."""

    name = "replacement"
    nfe_per_step = 1
    order = 1

    def __init__(self, operator: LinearOperator, y: Tensor, z: Tensor):
        if operator.pinv is None:
            raise ConfigError(f"the replacement baseline needs an operator with a pseudo-inverse; "
                              f"{operator.name} has none (use it for inpaint, inpaint_random, sr2, sr4)")
        self.op, self.y, self.Az = operator, y, operator.forward(z)

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        x = x + (t_next - t_cur) * call_velocity(model_fn, x, t_cur)
        y_t = (1 - t_next) * self.y + t_next * self.Az
        return x + self.op.pinv(y_t - self.op.forward(x)), state


def restore(model_fn, noise: Tensor, operator: LinearOperator, y: Tensor, method: str = "flowchef",
            steps: int = 20, shift: float = 1.0, step_size: float = 1.0, *, guide_last_step: bool = False
            ) -> SampleResult:
    """Solve ``y = A x0 + noise`` by steered sampling from ``noise [B, ...]`` at t = 1.

    ``method``: ``flowchef`` (FlowChefSolver with ``step_size`` and ``guide_last_step``),
    ``baseline`` (ReplacementSolver) or ``unguided`` (plain Euler, ignores ``y``). Runs under
    ``torch.no_grad``: no graph through ``model_fn``. Returns a ``SampleResult``
    (``x [B, ...]``, ``nfe`` = ``steps``).
    """
    if method == "flowchef":
        solver: Any = FlowChefSolver(operator, y, step_size, guide_last_step=guide_last_step)
    elif method == "baseline":
        solver = ReplacementSolver(operator, y, noise)
    elif method == "unguided":
        solver = "euler"
    else:
        raise ConfigError(f"unknown restoration method {method!r}; valid: {', '.join(RESTORE_METHODS)}")
    return sample(model_fn, noise, solver, schedule=sampling_grid(steps, shift))


def classifier_guided_sample(model_fn, noise: Tensor, classifier: torch.nn.Module, target: Tensor,
                             scale: float = 1.0, steps: int = 20, shift: float = 1.0) -> SampleResult:
    """Sample from ``noise [B, ...]`` steered towards classes ``target [B]`` by ``classifier``
    (FlowChef classifier guidance, 1 NFE per step)."""
    return sample(model_fn, noise, ClassifierGuidanceSolver(classifier, target, scale),
                  schedule=sampling_grid(steps, shift))


def _slice(op: LinearOperator, lo: int, hi: int) -> LinearOperator:
    if isinstance(op, Inpaint) and op.mask.shape[0] > 1:
        return Inpaint(op.mask[lo:hi])
    return op


@torch.no_grad()
def restore_images(model, y: Tensor, operator: LinearOperator, noise: Tensor, labels: Optional[Tensor] = None,
                   method: str = "flowchef", steps: int = 20, shift: float = 1.0, step_size: float = 1.0,
                   amp_dtype: Optional[torch.dtype] = None, batch_size: int = 256, device: Any = "cpu",
                   *, guide_last_step: bool = False) -> tuple[Tensor, int]:
    """Restore a batch of measurements ``y [N, ...]`` with a class-conditional model (``labels [N]``;
    None: the null class), starting from ``noise [N, C, H, W]``. Returns ``(images [N, C, H, W]
    float32 CPU, unclamped, NFE per image)``; per-image masks of ``operator`` are sliced per batch.
    ``step_size`` is per image (it does not depend on ``batch_size``); ``guide_last_step`` as in
    ``FlowChefSolver``."""
    if noise.shape[0] != y.shape[0]:
        raise ConfigError(f"noise batch {noise.shape[0]} does not match measurement batch {y.shape[0]}")
    device = torch.device(device)
    model.eval()
    outs, nfe = [], 0
    for lo in range(0, len(y), batch_size):
        hi = min(len(y), lo + batch_size)
        op = _slice(operator, lo, hi)
        if isinstance(op, Inpaint):
            op = Inpaint(op.mask.to(device))
        lab = None if labels is None else labels[lo:hi].to(device)
        res = restore(model_velocity(model, lab, 1.0, amp_dtype), noise[lo:hi].to(device).float(), op,
                      y[lo:hi].to(device).float(), method, steps, shift, step_size,
                      guide_last_step=guide_last_step)
        outs.append(res.x.float().cpu())
        nfe = max(nfe, res.nfe)
    return torch.cat(outs), nfe
