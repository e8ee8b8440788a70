"""Confidence-gated Taylor forecasting (CG-Taylor): run the first block, forecast the rest.

"Forecasting When to Forecast: Accelerating Diffusion Models with Confidence-Gated
Taylor" (arXiv 2508.02240); the defaults follow the authors' DiT code
(liuxiao-guan/CG-Taylor-DiT, ``models.py``: ``DiT.forward`` in mode ``"Firstblock"``;
``taylor_utils``: ``firstblock_*`` and ``step_*`` derivative / Taylor functions;
``sample.py``: threshold 0.008, ``--max_block_order 3``, ``--max-order 1``, ``--mid_cor 2``).

Two Taylor histories are kept, both in TaylorSeer's finite-difference form (see
``TaylorHistory``) with the model-call index as abscissa:

* the first block's **output** ``h_1 = block_0(x)`` (tokens, not the residual), order
  ``first_order`` (the reference's ``max_block_order``, 3);
* the last block's **output** ``h_L``, the stack output that the final layer reads, order
  ``order`` (the reference's ``max_order``, 1).

On every model call ``s`` the first block runs. The calls ``s < warmup`` (the reference's
``cnt <= mid_cor``: three calls) and the final call (``s = num_steps - 1``, known to
fixed-step solvers) always run the whole stack. On any other call the gate is the
relative L1 error of the first block's forecast::

    e(s) = mean|h_1_hat(s) - h_1(s)| / mean|h_1(s)|       (means over every element of the batch)

If ``e(s) < threshold`` the blocks ``1..L-1`` are skipped and the stack output is the
forecast ``h_L_hat(s)`` itself (the final layer then runs with the current call's
conditioning); neither history changes. Otherwise the remaining blocks run and both
histories take the new ``h_1`` and ``h_L``. Warm-up calls update both histories too; so
the first block's history changes exactly on the calls that compute the whole stack (the
reference leaves it alone on a final call whose gate passes, after which nothing is
forecast any more).

The reference indexes calls by the DDIM step ``i = N-1 .. 0`` (a decreasing abscissa);
every derivative estimate and every power of the distance then changes sign together, so
the forecasts equal those with the increasing call index used here (exactly: the sign
flips are exact in floating point). Under batched classifier-free guidance the doubled
batch shares one gate and one pair of histories, as in the reference's
``forward_with_cfg``.

Options of flowdit's own (not in the reference, off by default): ``feature="residual"``
gates on and forecasts the residuals ``h_1 - x`` and ``h_L - x`` and adds the current
input back; ``norm="l2"`` uses ``||.||_2`` ratios in the gate; ``max_skip`` bounds the
forecasts in a row; ``spaced`` restarts both histories at every warm-up call;
``form="newton"`` uses Newton interpolation (``flowdit.accel.forecast``).
"""

from __future__ import annotations

import math

import torch

from flowdit.errors import ConfigError

from .base import BlockPolicyBase, _flag, _in_range, _positive_int, step_of
from .forecast import NewtonForecaster

__all__ = ["GatedTaylor", "TaylorHistory", "gate_error"]

FORMS = ("paper", "newton")
FEATURES = ("output", "residual")
NORMS = ("l1", "l2")


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


def gate_error(forecast: torch.Tensor, actual: torch.Tensor, norm: str = "l1") -> float:
    """Relative error of ``forecast`` against ``actual``: ``mean|f - a| / mean|a|`` (``l1``,
    CG-Taylor's ``predict_loss``) or ``||f - a||_2 / ||a||_2`` (``l2``); means and norms run
    over every element. ``inf`` when ``actual`` is all zero and differs from ``forecast``."""
    diff = forecast - actual
    if norm == "l1":
        num, den = diff.abs().mean(), actual.abs().mean()
    else:
        num, den = torch.linalg.vector_norm(diff), torch.linalg.vector_norm(actual)
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else float("inf")
    return float(num / den)


def _history(form: str, order: int):
    return TaylorHistory(order) if form == "paper" else NewtonForecaster(order)


class GatedTaylor(BlockPolicyBase):
    """Forecast the stack output when the first block's own forecast is accurate (CG-Taylor).

    Args:
        threshold: relative L1 error of the first block's forecast under which the other
            blocks are skipped (0 = always full). The reference uses 0.008 on DiT-XL/2 and
            0.03-0.13 on FLUX; the value is model-specific.
        order: Taylor order of the stack-output forecast (reference ``max_order``, 1).
        first_order: Taylor order of the first block's forecast (``max_block_order``, 3).
        warmup: first calls that always run in full (reference ``mid_cor + 1`` = 3).
        form: ``"paper"`` (finite-difference Taylor) or ``"newton"``.
        feature: ``"output"`` (the blocks' outputs, the reference) or ``"residual"``
            (``h - x`` forecast and the current input added back; flowdit's variant).
        norm: ``"l1"`` (reference) or ``"l2"`` relative error in the gate.
        max_skip: at most this many forecasts in a row (0 = unbounded, the reference).
        spaced: restart both histories at every warm-up call.
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "gated_taylor"

    def __init__(self, threshold: float = 0.008, order: int = 1, first_order: int = 3, warmup: int = 3,
                 form: str = "paper", feature: str = "output", norm: str = "l1", max_skip: int = 0,
                 spaced: bool = False, cfg: str = "batched"):
        super().__init__(cfg)
        self.threshold = _in_range(self.name, "threshold", threshold, 0.0, float("inf"))
        self.order = _positive_int(self.name, "order", order, 0)
        self.first_order = _positive_int(self.name, "first_order", first_order, 0)
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        for key, value, allowed in (("form", form, FORMS), ("feature", feature, FEATURES), ("norm", norm, NORMS)):
            if value not in allowed:
                raise ConfigError(f"{self.name}: {key} must be one of {', '.join(allowed)}, got {value!r}")
        self.form, self.feature, self.norm = form, feature, norm
        self.max_skip = _positive_int(self.name, "max_skip", max_skip, 0)
        self.spaced = _flag(self.name, "spaced", spaced)

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        s = step_of(ctx)
        num_steps = getattr(ctx, "num_steps", None)
        h1 = self.run_blocks(model, tokens, c_act, ctx, 0, 1)
        f1 = h1 - tokens if self.feature == "residual" else h1
        first, last = st.get("first"), st.get("last")
        forced = first is None or s < self.warmup or (num_steps is not None and s == num_steps - 1)
        if not forced and (not self.max_skip or st["skipped"] < self.max_skip):
            err = gate_error(first.predict(s), f1, self.norm)
            st["last_error"] = err
            if err < self.threshold:
                st["skipped"] += 1
                pred = last.predict(s)
                return tokens + pred if self.feature == "residual" else pred
        out = self.run_blocks(model, h1, c_act, ctx, 1, None)
        if first is None or (self.spaced and s < self.warmup):
            first = st["first"] = _history(self.form, self.first_order)
            last = st["last"] = _history(self.form, self.order)
        first.update(s, f1)
        last.update(s, out - tokens if self.feature == "residual" else out)
        st["skipped"] = 0
        self.stats.full_calls += 1
        return out
