"""Confidence-gated Taylor forecasting: compute the first block, forecast the rest.

After "Forecasting When to Forecast" (confidence-gated Taylor caching): on every model
call the first block runs in full, and its output is also *forecast* from the first
block's history with the same Taylor scheme used for the stack. The first block's
relative forecast error ``||r_1 - r_1_hat|| / ||r_1||`` (``r_1`` its residual) is a cheap
proxy for how well the stack output can be forecast at this call: below ``threshold``
the stack output is the Taylor forecast of the last block's output (residual form, as in
``taylorseer``); otherwise the remaining blocks run and both histories are updated.
``max_skip`` bounds the number of consecutive forecasts.
"""

from __future__ import annotations

import torch

from flowdit.errors import ConfigError

from .base import BlockPolicyBase, _flag, _in_range, _positive_int, step_of
from .forecast import FORMS, build_forecaster


class GatedTaylor(BlockPolicyBase):
    """Forecast the stack when the first block's forecast error is below a threshold.

    Args:
        threshold: relative L2 error of the first block's forecast under which the rest
            of the stack is forecast (0 = always full).
        order: Taylor order k of both forecasts.
        form: ``"paper"`` or ``"newton"`` (see ``flowdit.accel.forecast``).
        max_skip: at most this many forecasts in a row.
        warmup: calls that always run in full (default ``order + 1``).
        spaced: restart both histories at every warmup call, so that the consecutive
            warmup calls do not enter the finite differences (as ``taylorseer``'s option).
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "gated_taylor"

    def __init__(self, threshold: float = 0.05, order: int = 1, form: str = "paper", max_skip: int = 4,
                 warmup: int | None = None, spaced: bool = False, cfg: str = "batched"):
        super().__init__(cfg)
        self.threshold = _in_range(self.name, "threshold", threshold, 0.0, float("inf"))
        self.order = _positive_int(self.name, "order", order, 0)
        if form not in FORMS:
            raise ConfigError(f"{self.name}: form must be one of {', '.join(FORMS)}, got {form!r}")
        self.form = form
        self.max_skip = _positive_int(self.name, "max_skip", max_skip, 0)
        self.warmup = self.order + 1 if warmup is None else _positive_int(self.name, "warmup", warmup, 0)
        self.spaced = _flag(self.name, "spaced", spaced)

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        s = step_of(ctx)
        h1 = self.run_blocks(model, tokens, c_act, ctx, 0, 1)
        r1 = h1 - tokens
        first, last = st.get("first"), st.get("last")
        if first is not None and s >= self.warmup and st["skipped"] < self.max_skip:
            err = torch.linalg.vector_norm(r1 - first.predict(s)) / torch.linalg.vector_norm(r1).clamp_min(1e-12)
            st["last_error"] = float(err)
            if float(err) < self.threshold:
                st["skipped"] += 1
                return tokens + last.predict(s)
        out = self.run_blocks(model, h1, c_act, ctx, 1, None)
        if first is None or (self.spaced and s < self.warmup):
            first = st["first"] = build_forecaster(self.form, self.order)
            last = st["last"] = build_forecaster(self.form, self.order)
        first.update(s, r1)
        last.update(s, out - tokens)
        st["skipped"] = 0
        self.stats.full_calls += 1
        return out
