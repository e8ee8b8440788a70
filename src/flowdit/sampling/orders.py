"""Measured convergence orders of fixed-step solvers on ODEs with closed-form solutions.

A solver of order ``p`` has global error ``e(N) ~ C N^-p`` after ``N`` uniform steps, so
halving the step gives ``log2(e(N) / e(2N)) -> p``. ``convergence`` integrates one of the
problems below from ``t = 1`` to ``t = 0`` at ``N, 2N, 4N, ...`` steps, takes the maximum
absolute error against the exact endpoint, and reports the order of every halving and a
least-squares slope over the finest halvings only (the coarse ones are pre-asymptotic:
the error there is not yet dominated by its leading term). The tests
(``tests/test_sampling.py``) and ``benchmarks/solver_orders.py`` use it; it also checks a
solver of one's own (any object of the solver extension point, or a name).

Problems (float64):

- ``riccati``: ``dx/dt = -(1 + t) x^2`` from ``x(1) = 0.1 .. 0.3`` (5 values); then
  ``1/x(t) = 1/x(1) + t + t^2/2 - 3/2`` and ``x(0) = 1 / (1/x(1) - 3/2)``. Nonlinear, so
  no error term of a second-order method cancels: it shows the generic order.
- ``gaussian``: the rectified flow from ``N(0, I)`` to ``N(mu, diag sigma^2)`` in 6
  dimensions, whose marginal velocity is exact: ``v(x, t) = a(t) (x - (1 - t) mu) - mu``,
  ``a = (t - (1 - t) sigma^2) / s^2``, ``s^2 = (1 - t)^2 sigma^2 + t^2``; the flow map
  sends ``z`` to ``mu + sigma z`` (8 points ``z`` drawn from seed 0). The field is linear
  in ``x``; for it the midpoint method's leading error term vanishes (order 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from flowdit.errors import ConfigError
from flowdit.sampling.sample import sample

__all__ = ["PROBLEMS", "Convergence", "convergence", "gaussian_velocity", "riccati_velocity"]

DEFAULT_STEPS = (8, 16, 32, 64, 128, 256, 512, 1024)

_D = 6
_MU = torch.linspace(-1.0, 1.0, _D, dtype=torch.float64)
_SIGMA = torch.linspace(0.3, 1.5, _D, dtype=torch.float64)


def riccati_velocity(x: Tensor, t: Tensor) -> Tensor:
    """``v(x, t) = -(1 + t) x^2`` for ``x [B, 1]``, ``t [B]``."""
    return -(1 + t.reshape(-1, 1)) * x**2


def gaussian_velocity(x: Tensor, t: Tensor) -> Tensor:
    """Exact marginal velocity of the Gaussian-to-Gaussian flow (module docstring), ``x [B, 6]``, ``t [B]``."""
    t = t.reshape(-1, 1)
    s2 = (1 - t) ** 2 * _SIGMA**2 + t**2
    return (t - (1 - t) * _SIGMA**2) / s2 * (x - (1 - t) * _MU) - _MU


def _riccati() -> tuple[Callable, Tensor, Tensor]:
    x1 = torch.linspace(0.1, 0.3, 5, dtype=torch.float64).reshape(-1, 1)
    return riccati_velocity, x1, 1 / (1 / x1 - 1.5)


def _gaussian() -> tuple[Callable, Tensor, Tensor]:
    z = torch.randn(8, _D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return gaussian_velocity, z, _MU + _SIGMA * z


PROBLEMS: dict[str, Callable[[], tuple[Callable, Tensor, Tensor]]] = {"riccati": _riccati, "gaussian": _gaussian}


@dataclass
class Convergence:
    """Errors and orders of one solver on one problem.

    Attributes:
        steps: the step counts ``N`` (each twice the previous).
        errors: max absolute endpoint error at each ``N``.
        halving: ``log2(e(N) / e(2N))`` for each consecutive pair (``len(steps) - 1``).
        order: least-squares slope of ``-log e`` against ``log N`` over the last ``finest + 1``
            step counts (the ``finest`` finest halvings).
        finest: how many halvings ``order`` is fitted on.
    """

    solver: str
    problem: str
    steps: list[int]
    errors: list[float]
    halving: list[float]
    order: float
    finest: int


def convergence(solver: Any, problem: str = "riccati", steps: Sequence[int] = DEFAULT_STEPS,
                finest: int = 3) -> Convergence:
    """Measure ``solver``'s order on ``problem`` by step halving (module docstring).

    ``steps`` must double from one entry to the next; ``order`` is fitted on the last
    ``finest`` halvings (``1 <= finest <= len(steps) - 1``).
    """
    if problem not in PROBLEMS:
        raise ConfigError(f"unknown convergence problem {problem!r}; valid: {', '.join(PROBLEMS)}")
    steps = [int(n) for n in steps]
    if len(steps) < 2 or any(b != 2 * a for a, b in zip(steps, steps[1:])) or steps[0] < 1:
        raise ConfigError(f"convergence steps must double from one entry to the next, got {steps}")
    if not 1 <= finest <= len(steps) - 1:
        raise ConfigError(f"finest must be in 1..{len(steps) - 1}, got {finest}")
    v, x1, exact = PROBLEMS[problem]()
    errors = [float((sample(v, x1, solver=solver, steps=n).x - exact).abs().max()) for n in steps]
    if min(errors) <= 0:
        raise ConfigError(f"solver {solver!r} is exact on {problem!r}: no order to measure")
    halving = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    tail = slice(len(steps) - finest - 1, None)
    order = -float(np.polyfit(np.log(steps[tail]), np.log(errors[tail]), 1)[0])
    name = solver if isinstance(solver, str) else getattr(solver, "name", type(solver).__name__)
    return Convergence(str(name), problem, steps, errors, halving, order, finest)
