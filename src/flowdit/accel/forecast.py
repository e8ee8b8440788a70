"""Forecasters of a feature ``f(s)`` from its values at past full-compute steps.

Both take ``update(s, f)`` at every full computation and ``predict(s)`` in between; ``s``
is the model-call index (``StepContext.step``), the abscissa of TaylorSeer's code.

* ``TaylorForecaster`` is TaylorSeer's form (Liu et al. 2025, "From Reusing to
  Forecasting: Accelerating Diffusion Models with TaylorSeers", arXiv 2503.06923,
  eq. 7-9): at each full step the ``i+1``-th derivative estimate is the difference of the
  new and the previous ``i``-th estimates divided by the distance between the two full
  steps, ``D^{i+1}_new = (D^i_new - D^i_old) / (s_new - s_old)`` with ``D^0 = f``; the
  forecast is the truncated Taylor series about the last full step,
  ``f(s) ~ sum_{i <= k} D^i (s - s_last)^i / i!``. It is exact for features linear in
  ``s``; beyond that the backward-difference estimates lag (``D^1`` is the slope at the
  midpoint of the last interval, not at ``s_last``), so a quadratic is not reproduced.
* ``NewtonForecaster`` keeps the last ``k + 1`` full-step features and evaluates the
  Newton interpolating polynomial through them (divided differences, any spacing):
  ``f(s) ~ sum_j f[s_0..s_j] prod_{m < j} (s - s_m)``. It is exact for polynomials of
  degree ``<= k`` (degree lower while fewer than ``k + 1`` points are known).
* ``TaylorHistory`` is the same finite-difference Taylor series written as CG-Taylor's
  ``taylor_utils`` evaluates it (``sum_i (1 / i!) * D^i * (s - s_last)^i``, accumulated from
  0); its rounding differs from ``TaylorForecaster``'s, so the confidence-gated forecast
  keeps it to match the authors' code bit for bit.

Features are tensors of any fixed shape (``[B, N, D]`` here).
"""

from __future__ import annotations

import math

import torch

from flowdit.errors import ConfigError

__all__ = ["TaylorForecaster", "NewtonForecaster", "TaylorHistory", "build_forecaster", "build_history", "FORMS"]

FORMS = ("paper", "newton")


class TaylorForecaster:
    """TaylorSeer's finite-difference Taylor forecast of order ``order`` (see module)."""

    def __init__(self, order: int):
        if not isinstance(order, int) or order < 0:
            raise ConfigError(f"forecast order must be an integer >= 0, got {order!r}")
        self.order = order
        self.factors: list[torch.Tensor] = []
        self.last_s: float | None = None

    @property
    def points(self) -> int:
        """Number of derivative estimates held (1 + the usable order)."""
        return len(self.factors)

    def update(self, s: float, feature: torch.Tensor) -> None:
        """Record the feature computed in full at step ``s``."""
        new = [feature]
        if self.last_s is not None:
            ds = float(s) - self.last_s
            if ds <= 0:
                raise ValueError(f"forecaster steps must increase, got {s} after {self.last_s}")
            for i in range(min(self.order, len(self.factors))):
                new.append((new[i] - self.factors[i]) / ds)
        self.factors, self.last_s = new, float(s)

    def predict(self, s: float) -> torch.Tensor:
        """``sum_i D^i (s - s_last)^i / i!`` over the derivative estimates held."""
        if not self.factors:
            raise RuntimeError("forecaster has no data: call update() first")
        dx = float(s) - self.last_s
        out = self.factors[0]
        for i in range(1, len(self.factors)):
            out = out + self.factors[i] * (dx**i / math.factorial(i))
        return out


class NewtonForecaster:
    """Newton backward-difference (divided-difference) forecast of degree ``order``."""

    def __init__(self, order: int):
        if not isinstance(order, int) or order < 0:
            raise ConfigError(f"forecast order must be an integer >= 0, got {order!r}")
        self.order = order
        self.s: list[float] = []
        self.f: list[torch.Tensor] = []

    @property
    def points(self) -> int:
        """Number of stored full-step features (at most ``order + 1``)."""
        return len(self.f)

    def update(self, s: float, feature: torch.Tensor) -> None:
        """Record the feature computed in full at step ``s`` (keeps the last ``order + 1``)."""
        if self.s and float(s) <= self.s[-1]:
            raise ValueError(f"forecaster steps must increase, got {s} after {self.s[-1]}")
        self.s.append(float(s))
        self.f.append(feature)
        self.s, self.f = self.s[-(self.order + 1):], self.f[-(self.order + 1):]

    def predict(self, s: float) -> torch.Tensor:
        """The interpolating polynomial through the stored points, evaluated at ``s``."""
        if not self.f:
            raise RuntimeError("forecaster has no data: call update() first")
        # Divided differences in place, newest point first so that a lower degree (few
        # points) still expands about the most recent step.
        xs = self.s[::-1]
        coef = list(self.f[::-1])
        n = len(xs)
        for j in range(1, n):
            for i in range(n - 1, j - 1, -1):
                coef[i] = (coef[i] - coef[i - 1]) / (xs[i] - xs[i - j])
        out = coef[n - 1]
        for i in range(n - 2, -1, -1):
            out = coef[i] + (float(s) - xs[i]) * out
        return out


class TaylorHistory:
    """Finite-difference Taylor history of one feature, as CG-Taylor's ``taylor_utils``.

    ``update(s, f)`` at a full computation: ``D^0 = f`` and, for ``i < order`` while an
    older ``D^i`` exists, ``D^{i+1} = (D^i_new - D^i_old) / (s - s_last)``.
    ``predict(s) = sum_i (1 / i!) * D^i * (s - s_last)^i``, in that order of operations
    (the reference's ``*_taylor_formula``). Exact for features linear in ``s``.
    Features are tensors of any fixed shape (``[B, N, D]`` here).
    """

    def __init__(self, order: int):
        self.order = order
        self.factors: list[torch.Tensor] = []
        self.last_s: int | float | None = None

    def update(self, s, feature: torch.Tensor) -> None:
        """Record the feature computed in full at call ``s``."""
        new = [feature]
        if self.factors:
            ds = s - self.last_s
            if ds <= 0:
                raise ValueError(f"history steps must increase, got {s} after {self.last_s}")
            for i in range(min(self.order, len(self.factors))):
                new.append((new[i] - self.factors[i]) / ds)
        self.factors, self.last_s = new, s

    def predict(self, s) -> torch.Tensor:
        """The truncated Taylor series about the last full call, evaluated at ``s``."""
        if not self.factors:
            raise RuntimeError("history has no data: call update() first")
        dx = s - self.last_s
        out = 0
        for i, d in enumerate(self.factors):
            out = out + (1 / math.factorial(i)) * d * (dx**i)
        return out


def build_forecaster(form: str, order: int):
    """A forecaster by name: ``"paper"`` (TaylorSeer) or ``"newton"``."""
    if form == "paper":
        return TaylorForecaster(order)
    if form == "newton":
        return NewtonForecaster(order)
    raise ConfigError(f"forecast form must be one of {', '.join(FORMS)}, got {form!r}")


def build_history(form: str, order: int):
    """CG-Taylor's forecaster by name: ``"paper"`` (``TaylorHistory``) or ``"newton"``."""
    if form == "paper":
        return TaylorHistory(order)
    if form == "newton":
        return NewtonForecaster(order)
    raise ConfigError(f"forecast form must be one of {', '.join(FORMS)}, got {form!r}")
