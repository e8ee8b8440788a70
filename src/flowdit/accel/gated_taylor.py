"""Confidence-gated Taylor forecasting (CG-Taylor): run the first block, forecast the rest.

"Forecasting When to Forecast: Accelerating Diffusion Models with Confidence-Gated
Taylor" (arXiv 2508.02240); the defaults follow the authors' DiT code
(liuxiao-guan/CG-Taylor-DiT, ``models.py``: ``DiT.forward`` in mode ``"Firstblock"``;
``taylor_utils``: ``firstblock_*`` and ``step_*`` derivative / Taylor functions;
``sample.py``: threshold 0.008, ``--max_block_order 3``, ``--max-order 1``, ``--mid_cor 2``).

Two Taylor histories are kept, both in TaylorSeer's finite-difference form (see
``forecast.TaylorHistory``) with the model-call index as abscissa:

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

As a cache: the gate ``ConfidenceGate`` (runs block 0, keeps the first block's history,
compares its forecast) combined with the reuse ``TaylorReuse`` of the stack output (or
residual) in CG-Taylor's arithmetic (``forecast.TaylorHistory``), never restarted except
with ``spaced`` during the warm-up.
"""

from __future__ import annotations

from functools import partial

from flowdit.errors import ConfigError

from .base import _flag, _in_range, _positive_int
from .cache import Cache
from .forecast import TaylorHistory, build_history
from .gates import FEATURES, NORMS, ConfidenceGate, gate_error
from .reuses import TaylorReuse

__all__ = ["GatedTaylor", "TaylorHistory", "gate_error"]

FORMS = ("paper", "newton")


class GatedTaylor(Cache):
    """Forecast the stack output when the first block's own forecast is accurate (CG-Taylor).

    ``ConfidenceGate(threshold, first_order, warmup, form, feature, norm, max_skip, spaced)``
    + ``TaylorReuse(order, "stack", feature, TaylorHistory / Newton, restart_before =
    warmup with spaced, else 0)``.

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
        super().__init__(cfg=cfg)
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
        self.combine(ConfidenceGate(self.threshold, self.first_order, self.warmup, self.form, self.feature, self.norm,
                                    self.max_skip, self.spaced),
                     TaylorReuse(self.order, "stack", self.feature, partial(build_history, self.form),
                                 self.warmup if self.spaced else 0))
