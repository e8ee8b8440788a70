"""TaylorSeer: forecast every block's attention and MLP outputs between full calls.

Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with
TaylorSeers" (arXiv 2503.06923). On a full call each block's attention and MLP outputs,
taken *before* their adaLN gates, update finite-difference derivative estimates (eq. 7-9,
``flowdit.accel.forecast``); on the calls in between they are predicted by a Taylor series
about the last full call and multiplied by the *current* call's gates, as the authors'
DiT code does (Shenyi-Z/TaylorSeer, ``TaylorSeer-DiT/models.py``, ``DiTBlock.forward``;
``taylor_utils/__init__.py``; ``cache_functions/cal_type.py``). The abscissa of the series
is the model-call index (the reference's step index; it counts down there, which flips
the sign of both the distances and the offsets and leaves the forecast unchanged).

Schedule and warm-up as in ``cal_type`` / ``derivative_approximation``: the first
``warmup`` calls (``first_enhance``: 2 in the DiT code, 3 in the FLUX code) run in full,
then one full call every ``interval`` calls. A full call at index ``s < warmup - 1``
*restarts* the derivative estimates (only ``D^0`` is kept); from ``s = warmup - 1`` on every
full call extends them by one difference. So the last warm-up call is differenced against
the one before it, and the first forecast interval uses at most a first-order series.

Options of flowdit's own (not the reference's defaults):

* ``cache="stack"`` forecasts one tensor, the residual ``out - in`` of the whole stack,
  and adds it to the current input tokens: cheaper (one forecast instead of ``2 x
  depth``), but it freezes the adaLN gates of the last full call inside the forecast.
* ``spaced=true`` also restarts the estimates at the last warm-up call, so that no slope
  comes from two consecutive calls: every difference then spans ``interval`` calls (until
  two such full calls exist the forecast is plain reuse). Near ``t = 1`` the features move
  fastest and the consecutive-call slope is extrapolated over a whole interval
  (docs/acceleration.md measures what that costs).
* ``form="newton"``: Newton interpolation through the last ``order + 1`` full calls.

As a cache: the gate ``ScheduleGate`` with schedule ``since`` (the warm-up, then a full
call once ``interval`` calls have passed since the last one) combined with the reuse
``TaylorReuse`` (per-block branches or the stack residual, TaylorSeer's forecaster and
restart rule).
"""

from __future__ import annotations

from functools import partial

from flowdit.errors import ConfigError

from .base import CACHE_TARGETS, _choice, _flag, _positive_int
from .cache import Cache
from .forecast import FORMS, build_forecaster
from .gates import ScheduleGate
from .reuses import TaylorReuse

__all__ = ["TaylorSeer"]


class TaylorSeer(Cache):
    """Full stack every ``interval`` calls after a warm-up, Taylor forecasts in between.

    ``ScheduleGate(interval, "since", warmup)`` + ``TaylorReuse(order, cache, "residual",
    form, restart_before = warmup - 1, or warmup with spaced)``.

    Args:
        interval: N, calls between full computations (1 = always full); reference 4.
        order: k, the highest derivative estimated (0 = plain reuse); the reference's
            ``max_order``, 4 in its DiT sampler.
        form: ``"paper"`` (TaylorSeer's recursive differences) or ``"newton"``
            (interpolation through the last ``k + 1`` full calls, exact for degree k).
        warmup: the reference's ``first_enhance``: calls ``0 .. warmup - 1`` run in full,
            and those before ``warmup - 1`` restart the derivative estimates (2, as in the
            DiT code; 3 reproduces the FLUX code).
        cache: ``"blocks"`` (default, the reference) or ``"stack"`` (see module docstring).
        spaced: restart the estimates at every warm-up call (see module docstring).
        cfg: ``"batched"`` (default, as the reference: one state for the doubled CFG
            batch) or ``"split"``.
    """

    name = "taylorseer"

    def __init__(self, interval: int = 4, order: int = 4, form: str = "paper", warmup: int = 2,
                 cache: str = "blocks", spaced: bool = False, cfg: str = "batched"):
        super().__init__(cfg=cfg)
        self.interval = _positive_int(self.name, "interval", interval)
        self.order = _positive_int(self.name, "order", order, 0)
        if form not in FORMS:
            raise ConfigError(f"{self.name}: form must be one of {', '.join(FORMS)}, got {form!r}")
        self.form = form
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self.cache = _choice(self.name, "cache", cache, CACHE_TARGETS)
        self.spaced = _flag(self.name, "spaced", spaced)
        # A full call at s < restart_before drops the derivative estimates.
        restart_before = self.warmup if self.spaced else self.warmup - 1
        self.combine(ScheduleGate(self.interval, "since", self.warmup),
                     TaylorReuse(self.order, self.cache, "residual", partial(build_forecaster, self.form),
                                 restart_before))
