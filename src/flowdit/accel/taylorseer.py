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
"""

from __future__ import annotations

import torch

from flowdit.errors import ConfigError

from .base import CACHE_TARGETS, BlockPolicyBase, _choice, _flag, _positive_int, step_of
from .forecast import FORMS, build_forecaster


class TaylorSeer(BlockPolicyBase):
    """Full stack every ``interval`` calls after a warm-up, Taylor forecasts in between.

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
        super().__init__(cfg)
        self.interval = _positive_int(self.name, "interval", interval)
        self.order = _positive_int(self.name, "order", order, 0)
        if form not in FORMS:
            raise ConfigError(f"{self.name}: form must be one of {', '.join(FORMS)}, got {form!r}")
        self.form = form
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self.cache = _choice(self.name, "cache", cache, CACHE_TARGETS)
        self.spaced = _flag(self.name, "spaced", spaced)

    def _restarts(self, s: int) -> bool:
        """Whether a full call at index ``s`` drops the derivative estimates."""
        return s < (self.warmup if self.spaced else self.warmup - 1)

    @property
    def requires(self) -> frozenset[str]:
        return frozenset({"block_branches"}) if self.cache == "blocks" else frozenset()

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        s = step_of(ctx)
        fc = st.get("forecaster")
        if fc is None or s < self.warmup or s - st["last_full"] >= self.interval:
            self.stats.full_calls += 1
            if self.cache == "stack":
                out = self.run_blocks(model, tokens, c_act, ctx)
                feature = out - tokens
            else:
                out, branches = self.run_blocks_branches(model, tokens, c_act, ctx)
                # One stacked tensor [2 x depth, B, N, D] (a_0, m_0, a_1, ...): every branch
                # gets the same per-feature update, so one forecaster serves all of them
                # with a few large element-wise ops per call. Differences are taken in fp32
                # because under bf16 autocast the branch outputs are bf16, whose 8-bit
                # mantissa would swamp the small changes between calls.
                feature = torch.stack([f for pair in branches for f in pair]).float()
            if fc is None or self._restarts(s):
                fc = st["forecaster"] = build_forecaster(self.form, self.order)
            fc.update(s, feature)
            st["last_full"] = s
            return out
        if self.cache == "stack":
            return tokens + fc.predict(s)
        predicted = fc.predict(s).unbind(0)
        return self.replay_blocks(model, tokens, c_act, ctx, list(zip(predicted[0::2], predicted[1::2])))
