"""The sampling loop: integrate ``dx/dt = v(x, t)`` over a time grid.

One loop serves every fixed-step solver (the loop knows nothing about any particular
solver); adaptive torchdiffeq methods (``dopri5``, ...) go through ``torchdiffeq.odeint``.
A decreasing grid (1 -> 0) maps noise to data; an increasing grid (0 -> 1) maps data to
noise, i.e. inversion, with the same code. The number of velocity evaluations (NFE) is
counted by wrapping ``model_fn``, so it is what actually ran, adaptive steps included.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowdit.errors import ConfigError
from flowdit.sampling.context import StepContext
from flowdit.sampling.schedules import build_schedule, shifted
from flowdit.sampling.solvers import SOLVERS, ModelFn, Solver, build_solver

__all__ = ["SampleResult", "ADAPTIVE_METHODS", "sample", "CountingModelFn"]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
DEFAULT_STEPS = 50


@dataclass
class SampleResult:
    """Output of ``sample``.

    Attributes:
        x: the endpoint, ``[B, ...]``.
        nfe: velocity-function evaluations actually made.
        trajectory: states at every grid time (``len = steps + 1``, the start
            included), or ``None`` unless requested.
        times: the time grid that was integrated over (float64), ``[steps + 1]``; for
            adaptive methods the requested output times (``[2]`` unless a grid was given).
    """

    x: Tensor
    nfe: int
    trajectory: list[Tensor] | None
    times: Tensor


class CountingModelFn:
    """Wraps ``model_fn(x, t)`` and counts its calls in ``.calls``.

    With a ``StepContext`` it also records, before each call, the call index
    (``ctx.step``), its index within the solver step (``ctx.eval_in_step``) and its time
    ``ctx.t``, fires the context's ``begin_evaluation`` hooks, and after the call hands
    the returned velocity (the one the solver uses, guidance applied) to its
    ``after_velocity`` hooks (``flowdit.core.hooks``).
    """

    def __init__(self, model_fn: ModelFn, ctx: StepContext | None = None):
        self.model_fn = model_fn
        self.calls = 0
        self.ctx = ctx

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        ctx = self.ctx
        if ctx is None:
            self.calls += 1
            return self.model_fn(x, t)
        ctx.step = self.calls
        ctx.t = float(torch.as_tensor(t).reshape(-1)[0])
        for hook in ctx.hooks.begin_evaluation:
            hook(ctx)
        self.calls += 1
        v = self.model_fn(x, t)
        for hook in ctx.hooks.after_velocity:
            hook(v, ctx)
        ctx.eval_in_step += 1
        return v


def _resolve_grid(
    steps: int | None, schedule: None | str | Tensor, shift: float
) -> Tensor:
    """Build or validate the float64 time grid ``[N + 1]``."""
    if schedule is None or isinstance(schedule, str):
        n = DEFAULT_STEPS if steps is None else steps
        if schedule is None:
            return shifted(n, shift, dtype=torch.float64)
        if schedule == "uniform" and shift != 1.0:
            raise ConfigError(
                f"schedule 'uniform' does not take shift={shift}; use schedule='shifted'"
            )
        kw = {"shift": shift} if schedule == "shifted" else {}
        return build_schedule(schedule, n, dtype=torch.float64, **kw)
    if not isinstance(schedule, Tensor):
        raise ConfigError(
            f"schedule must be None, a name or a 1-D tensor, got {type(schedule).__name__}"
        )
    if shift != 1.0:
        raise ConfigError(
            f"shift={shift} cannot be applied to an explicit schedule tensor; shift the grid "
            "yourself with flowdit.core.shift_time"
        )
    grid = schedule.detach().to(device="cpu", dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2:
        raise ConfigError(
            f"schedule must be a 1-D tensor of >= 2 times, got shape {tuple(grid.shape)}"
        )
    if steps is not None and steps != grid.numel() - 1:
        raise ConfigError(
            f"steps={steps} does not match the schedule's {grid.numel() - 1} steps"
        )
    if not torch.isfinite(grid).all() or grid.min() < 0 or grid.max() > 1:
        raise ConfigError(f"schedule times must lie in [0, 1], got {grid.tolist()}")
    d = grid.diff()
    if not ((d < 0).all() or (d > 0).all()):
        raise ConfigError(
            f"schedule must be strictly decreasing (sampling) or strictly increasing "
            f"(inversion), got {grid.tolist()}"
        )
    return grid


def _odeint(
    fn: CountingModelFn, noise: Tensor, grid: Tensor, method: str, rtol: float, atol: float
) -> list[Tensor]:
    from torchdiffeq import odeint

    work_dtype = noise.dtype if noise.dtype in (torch.float32, torch.float64) else torch.float32
    y0 = noise.to(work_dtype)
    b = y0.shape[0]

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        return fn(y, t.to(work_dtype).expand(b)).to(work_dtype)

    ts = grid.to(device=noise.device, dtype=work_dtype)
    out = odeint(rhs, y0, ts, rtol=rtol, atol=atol, method=method)
    return [o.to(noise.dtype) for o in out]


def sample(
    model_fn: ModelFn,
    noise: Tensor,
    solver: str | Solver = "euler",
    steps: int | None = None,
    schedule: None | str | Tensor = None,
    shift: float = 1.0,
    progress: bool = False,
    return_trajectory: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    grad: bool = False,
    step_context: StepContext | None = None,
) -> SampleResult:
    """Integrate ``dx/dt = model_fn(x, t)`` from the first to the last grid time.

    Args:
        model_fn: velocity function ``(x [B, ...], t [B]) -> v [B, ...]`` (wrap a
            conditional model with ``cfg_velocity`` first).
        noise: the starting state ``[B, ...]`` (noise when sampling, data when the
            grid increases, i.e. inversion).
        solver: a registry name (``euler, heun, midpoint, rf2, rf3, fireflow``), a solver object,
            or a torchdiffeq adaptive method (``dopri5``, ...), which ignores ``steps``
            and uses ``rtol`` / ``atol``.
        steps: number of steps N (default 50); must equal ``len(schedule) - 1`` if
            a schedule tensor is given.
        schedule: ``None`` (uniform grid shifted by ``shift``), a schedule name
            (``"uniform"``, ``"shifted"``), or an explicit strictly monotone tensor of
            times in [0, 1]: decreasing samples (1 -> 0), increasing inverts (0 -> 1).
        shift: SD3 time shift for generated grids (``core.timesteps.shift_time``).
        progress: show a tqdm progress bar.
        return_trajectory: also return the state at every grid time.
        rtol, atol: tolerances of adaptive methods.
        grad: keep autograd enabled (default runs under ``torch.no_grad()``).
        step_context: the ``StepContext`` that ``model_fn`` hands to the model (see
            ``flowdit.core.hooks``); the loop resets its hooks at the start and sets
            ``step``, ``solver_step``, ``eval_in_step``, ``t``, ``t_step`` and ``t_next``
            before every model call.

    Returns:
        ``SampleResult(x, nfe, trajectory, times)``.
    """
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise ConfigError(f"noise must be a floating tensor [B, ...], got {type(noise).__name__}")
    counted = CountingModelFn(model_fn, step_context)
    ctx = nullcontext() if grad else torch.no_grad()

    if isinstance(solver, str) and solver.strip().lower() in ADAPTIVE_METHODS:
        method = solver.strip().lower()
        if schedule is None or isinstance(schedule, str):
            grid = torch.tensor([1.0, 0.0], dtype=torch.float64)
        else:
            grid = _resolve_grid(None, schedule, shift)
        if step_context is not None:
            step_context.begin(None, None)
        with ctx:
            states = _odeint(counted, noise, grid, method, rtol, atol)
        return SampleResult(
            x=states[-1],
            nfe=counted.calls,
            trajectory=states if return_trajectory else None,
            times=grid,
        )

    if isinstance(solver, str) and solver.strip().lower().replace("-", "_") not in SOLVERS:
        raise ConfigError(
            f"unknown solver {solver!r}; fixed-step: {', '.join(SOLVERS)}; "
            f"adaptive: {', '.join(ADAPTIVE_METHODS)}"
        )
    step_solver = build_solver(solver)
    grid = _resolve_grid(steps, schedule, shift)
    ts = grid.tolist()
    x = noise
    trajectory = [x] if return_trajectory else None
    state = None
    name = getattr(step_solver, "name", type(step_solver).__name__)
    if step_context is not None:
        per_step = getattr(step_solver, "nfe_per_step", None)
        n_steps = len(ts) - 1
        step_context.begin(per_step * n_steps if per_step else None, n_steps)
    with ctx:
        for i in tqdm(range(len(ts) - 1), desc=f"sampling ({name})", disable=not progress):
            if step_context is not None:
                step_context.solver_step = i
                step_context.eval_in_step = 0
                step_context.t_step, step_context.t_next = ts[i], ts[i + 1]
            x, state = step_solver.step(counted, x, ts[i], ts[i + 1], state)
            if trajectory is not None:
                trajectory.append(x)
    return SampleResult(x=x, nfe=counted.calls, trajectory=trajectory, times=grid)
