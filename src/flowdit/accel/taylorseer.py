"""TaylorSeer: forecast the block stack's output between full computations.

Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with
TaylorSeers" (arXiv 2503.06923). Every ``interval`` model calls the stack runs in full
and the derivative estimates of its features are updated by finite differences; in
between, the features are predicted by a Taylor series of order ``order`` (see
``flowdit.accel.forecast`` for both forms). The paper forecasts each attention and MLP
output; here the forecast feature is the stack residual ``out - in``, which is the sum
of every gated branch output of a pre-norm residual stack, so the forecast is the same
linear combination and only the (exact, cheap) input embedding of the current call is
added back.

``spaced=true`` changes one thing: the warmup calls run in full as before, but the finite
differences restart at each of them, so every derivative estimate comes from full calls
one ``interval`` apart (until two such calls exist the forecast is plain reuse). In the
paper's code the consecutive warmup calls enter the differences too; where the features
change fastest at the first calls (t near 1), the slope between calls 0 and 1 is then
extrapolated over the whole first interval (docs/acceleration.md measures what that costs).
"""

from __future__ import annotations

from flowdit.errors import ConfigError

from .base import BlockPolicyBase, _flag, _positive_int, step_of
from .forecast import FORMS, build_forecaster


class TaylorSeer(BlockPolicyBase):
    """Full stack every ``interval`` calls, a Taylor forecast of its residual in between.

    Args:
        interval: N, calls between full computations (1 = always full).
        order: k, the highest derivative estimated (0 = plain reuse, as FORA).
        form: ``"paper"`` (TaylorSeer's recursive differences) or ``"newton"``
            (interpolation through the last ``k + 1`` full steps, exact for degree k).
        warmup: the first calls that always run in full (the paper's ``first_enhance``);
            default ``order + 1`` so that every derivative has data before forecasting.
        spaced: build the differences only from full calls ``interval`` apart, not from
            the consecutive warmup calls (see module docstring).
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "taylorseer"

    def __init__(self, interval: int = 4, order: int = 2, form: str = "paper", warmup: int | None = None,
                 spaced: bool = False, cfg: str = "batched"):
        super().__init__(cfg)
        self.interval = _positive_int(self.name, "interval", interval)
        self.order = _positive_int(self.name, "order", order, 0)
        if form not in FORMS:
            raise ConfigError(f"{self.name}: form must be one of {', '.join(FORMS)}, got {form!r}")
        self.form = form
        self.warmup = self.order + 1 if warmup is None else _positive_int(self.name, "warmup", warmup, 0)
        self.spaced = _flag(self.name, "spaced", spaced)

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        s = step_of(ctx)
        fc = st.get("forecaster")
        if fc is None or s < self.warmup or s - st["last_full"] >= self.interval:
            out = self.run_blocks(model, tokens, c_act, ctx)
            if fc is None or (self.spaced and s < self.warmup):
                fc = st["forecaster"] = build_forecaster(self.form, self.order)
            fc.update(s, out - tokens)
            st["last_full"] = s
            self.stats.full_calls += 1
            return out
        return tokens + fc.predict(s)
