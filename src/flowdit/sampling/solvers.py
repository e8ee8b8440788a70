"""Fixed-step ODE solvers for ``dx/dt = v(x, t)``: the solver extension point.

A solver is an object with ``name``, ``nfe_per_step`` and
``step(model_fn, x, t_cur, t_next, state) -> (x_next, state)``, where
``model_fn(x [B, ...], t [B]) -> v [B, ...]`` and ``t_cur``, ``t_next`` are floats or
0-d tensors. Every step uses ``h = t_next - t_cur``, so the same code integrates
noise -> data (h < 0, sampling) and data -> noise (h > 0, inversion). ``state`` is
carried between steps for multistep solvers; the one-step solvers here return it
unchanged. Adaptive solvers (dopri5, ...) are not step functions: see ``sample.py``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from flowdit.errors import ConfigError

__all__ = [
    "ModelFn",
    "Solver",
    "Euler",
    "Heun",
    "Midpoint",
    "RFSolver",
    "FireFlow",
    "Renoise",
    "SOLVERS",
    "build_solver",
    "call_velocity",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]


def _time_dtype(x: Tensor) -> torch.dtype:
    # Half-precision times lose the step structure (bf16 has 8 bits of mantissa), so
    # times stay at least float32 even when the state is half precision.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def call_velocity(model_fn: ModelFn, x: Tensor, t: float | Tensor) -> Tensor:
    """Evaluate ``model_fn(x, t)`` with the scalar time ``t`` broadcast to shape ``[B]``."""
    t_vec = torch.full((x.shape[0],), float(t), dtype=_time_dtype(x), device=x.device)
    return model_fn(x, t_vec)


class Solver:
    """Base class of fixed-step solvers (see the module docstring for the contract)."""

    name: str = "solver"
    nfe_per_step: int = 1
    order: int = 1

    def step(
        self, model_fn: ModelFn, x: Tensor, t_cur: float | Tensor, t_next: float | Tensor,
        state: Any = None,
    ) -> tuple[Tensor, Any]:
        """Advance ``x`` from ``t_cur`` to ``t_next``; return ``(x_next, state)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euler(Solver):
    """Explicit Euler: ``x + h v(x, t)``. Order 1, 1 NFE per step."""

    name = "euler"
    nfe_per_step = 1
    order = 1

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        return x + (t_next - t_cur) * call_velocity(model_fn, x, t_cur), state


class Heun(Solver):
    """Heun's method (explicit trapezoid): Euler predictor, average of the two slopes.

    ``k1 = v(x, t)``, ``k2 = v(x + h k1, t + h)``, ``x + h (k1 + k2) / 2``.
    Order 2, 2 NFE per step (Karras et al. 2022 use it with a final Euler step; here the
    velocity is finite at t = 0, so every step is a full Heun step).
    """

    name = "heun"
    nfe_per_step = 2
    order = 2

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        h = t_next - t_cur
        k1 = call_velocity(model_fn, x, t_cur)
        k2 = call_velocity(model_fn, x + h * k1, t_next)
        return x + 0.5 * h * (k1 + k2), state


class Midpoint(Solver):
    """Explicit midpoint: ``x + h v(x + h/2 v(x, t), t + h/2)``. Order 2, 2 NFE per step."""

    name = "midpoint"
    nfe_per_step = 2
    order = 2

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        h = t_next - t_cur
        k1 = call_velocity(model_fn, x, t_cur)
        k2 = call_velocity(model_fn, x + 0.5 * h * k1, t_cur + 0.5 * h)
        return x + h * k2, state


class RFSolver(Solver):
    """RF-Solver: Taylor expansion of the ODE solution in time (Wang et al. 2024).

    "Taming Rectified Flow for Inversion and Editing", arXiv 2411.04746, writes one step
    as the truncated Taylor series of the exact solution along the trajectory,

        x(t + h) = x + h v + h^2/2 v' + h^3/6 v'' + O(h^4),

    with ``v^(k)`` the total time derivatives of ``v(x(t), t)``, estimated by finite
    differences of extra evaluations.

    ``order=2`` (the paper's RF-Solver-2, as in its public code): ``k1 = v(x, t)``,
    ``k2 = v(x + h/2 k1, t + h/2)``, ``v' ~ (k2 - k1) / (h/2)``, then
    ``x + h k1 + h^2/2 v'``. This equals explicit midpoint algebraically
    (``h k1 + h (k2 - k1) = h k2``); tests check the identity. 2 NFE per step.

    ``order=3``: the paper states the general expansion but its public code implements
    only order 2, so the second-derivative estimate here is our own. We add a third
    evaluation at the end of the step, ``k3 = v(x + h (2 k2 - k1), t + h)``, and fit
    the quadratic through ``(0, k1), (h/2, k2), (h, k3)``:
    ``v' ~ (-3 k1 + 4 k2 - k3) / h``, ``v'' ~ 4 (k1 - 2 k2 + k3) / h^2``. With those,
    the Taylor form equals Kutta's third-order Runge-Kutta method (Simpson weights
    1/6, 2/3, 1/6). The probe state ``x + h (2 k2 - k1) = x + h k1 + h^2 (k2 - k1) / (h/2)``
    is not the second-order Taylor predictor: with nodes (0, 1/2, 1) it is the only
    choice for which the O(h^2) error of the half-step probe cancels, which is what
    makes the step third order (a probe at ``x + h k2`` would leave it second order).
    3 NFE per step; measured order ~3 in ``tests/test_sampling.py``.
    """

    nfe_per_step = 2

    def __init__(self, order: int = 2):
        if order not in (2, 3):
            raise ConfigError(f"RF-Solver order must be 2 or 3, got order={order!r}")
        self.order = order
        self.nfe_per_step = order
        self.name = f"rf{order}"

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        h = t_next - t_cur
        if h == 0:
            return x, state
        k1 = call_velocity(model_fn, x, t_cur)
        k2 = call_velocity(model_fn, x + 0.5 * h * k1, t_cur + 0.5 * h)
        if self.order == 2:
            dv = (k2 - k1) / (0.5 * h)
            return x + h * k1 + 0.5 * h * h * dv, state
        k3 = call_velocity(model_fn, x + h * (2.0 * k2 - k1), t_next)
        dv = (4.0 * k2 - 3.0 * k1 - k3) / h
        d2v = 4.0 * (k1 - 2.0 * k2 + k3) / (h * h)
        return x + h * k1 + (h * h / 2.0) * dv + (h**3 / 6.0) * d2v, state

    def __repr__(self) -> str:
        return f"RFSolver(order={self.order})"


class FireFlow(Solver):
    """FireFlow (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow for Image
    Semantic Editing", arXiv 2412.07517): explicit midpoint whose start-of-step velocity
    is the midpoint velocity of the previous step, reused instead of re-evaluated.

    Step ``n``: ``k1 = m_{n-1}`` (``v(x, t)`` on the first step), ``m_n = v(x + h/2 k1,
    t + h/2)``, ``x + h m_n``. The reused slope is off by O(h) in the probe only, so the
    step keeps second-order accuracy at 1 NFE per step after the first: N steps cost N + 1
    evaluations. Measured by step halving over N = 128..1024
    (``benchmarks/solver_orders.py``, ``tests/test_sampling.py``): 1.997 on the nonlinear
    closed-form problem, 1.982 on the Gaussian flow; coarse grids are pre-asymptotic
    (halvings 1.3-2.5, docs/sampling.md). ``state`` carries ``m_n``; the sampling loop
    starts every run with ``state = None``, so runs never share it.
    """

    name = "fireflow"
    nfe_per_step = 1
    order = 2

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        h = t_next - t_cur
        k1 = call_velocity(model_fn, x, t_cur) if state is None else state
        mid = call_velocity(model_fn, x + 0.5 * h * k1, t_cur + 0.5 * h)
        return x + h * mid, mid


class Renoise(Solver):
    """The few-step sampler of 2-rectified flow++ (Lee, Lin & Fanti, "Improving the
    Training of Rectified Flows", NeurIPS 2024; ``--sampler new`` with ``--solver euler``
    in their public code, github.com/sangyun884/rfpp, ``generate.py``).

    Each step predicts the data from the current state, ``x0_hat = x - t v(x, t)``
    (:func:`flowdit.core.path.x0_from_velocity`), and puts the next state on the straight
    line between ``x0_hat`` and the *initial* noise ``z``: ``x' = (1 - t') x0_hat + t' z``.
    Euler would instead move along ``v``, i.e. toward the noise the model implies at ``x``,
    ``eps_hat = x + (1 - t) v``; the two agree exactly when ``eps_hat = z``, as on a
    perfectly straight (reflowed) trajectory, and re-noising with ``z`` keeps later steps
    from drifting off the line the first step chose.

    ``z`` is the state at the first grid time (the noise when the grid starts at t = 1,
    as in the paper's code, which starts at ``1 - 1e-5``); the loop starts every run with
    ``state = None``, so it is never shared between runs. One step from t = 1 equals one
    Euler step, and so does the last step to t' = 0 (where ``z`` has no weight): on a grid
    from 1 to 0 the sampler equals Euler at 1 and 2 steps and differs from 3 steps on.
    1 NFE per step; ``x, z: [B, ...]``.
    """

    name = "renoise"
    nfe_per_step = 1
    order = 1

    def step(self, model_fn, x, t_cur, t_next, state=None):
        t_cur, t_next = float(t_cur), float(t_next)
        z = x if state is None else state
        x0_hat = x - t_cur * call_velocity(model_fn, x, t_cur)
        return (1.0 - t_next) * x0_hat + t_next * z, z


SOLVERS: dict[str, Callable[[], Solver]] = {
    "euler": Euler,
    "heun": Heun,
    "midpoint": Midpoint,
    "rf2": lambda: RFSolver(2),
    "rf3": lambda: RFSolver(3),
    "rf_solver": lambda: RFSolver(2),
    "rf_solver2": lambda: RFSolver(2),
    "rf_solver3": lambda: RFSolver(3),
    "fireflow": FireFlow,
    "renoise": Renoise,
}


def build_solver(name: str | Solver) -> Solver:
    """Return a solver instance for a registry name (``euler, heun, midpoint, rf2, rf3, fireflow, renoise``,
    aliases ``rf_solver2``, ``rf_solver3``), or pass a solver object (anything with a
    ``step`` method) through unchanged."""
    if isinstance(name, Solver) or (not isinstance(name, str) and hasattr(name, "step")):
        return name
    key = str(name).strip().lower().replace("-", "_")
    if key not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; valid: {', '.join(SOLVERS)}")
    return SOLVERS[key]()
