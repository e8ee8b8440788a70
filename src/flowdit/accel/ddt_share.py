"""DDT encoder sharing: reuse a Decoupled Diffusion Transformer's encoder state between steps.

Wang et al. 2025, "DDT: Decoupled Diffusion Transformer" (arXiv 2504.05741), sec. 3.3: the
decoder of a DDT (``flowdit.models.ddt``) sees time and class only through the encoder
state ``s``, and ``s`` changes slowly along a sampling trajectory, so the encoder can run on
``K`` of the ``N`` model calls while every call runs the decoder on the latest ``s``
(including the time embedding folded into it at the call that computed it). The authors'
code (``MCG-NJU/DDT``) has two schedules:

* **uniform** (``src/diffusion/stateful_flow_matching/sampling.py``,
  ``EulerSampler._impl_sampling``): ``s`` is recomputed at step ``i`` when ``i %
  state_refresh_rate == 0`` (here ``interval``).
* **dp** (``sharing_sampling.py``, ``EulerSampler.sharing_dp`` and ``__call__``; the same
  algorithm as ``tools/dp.py``): ``K = int(N / state_refresh_rate)`` (here ``k``, or
  ``int(N / interval)`` when ``k`` is 0). A calibration trajectory (8 template noises and
  random labels from seed 0, the sampler's own settings, ``s`` recomputed at every step)
  records the states ``s_0 .. s_{N-1}``; ``sim[i, j]`` is the cosine similarity of ``s_i``
  and ``s_j`` per token, averaged over tokens (and batch rows); with ``e = 1 - sim`` the cost
  of computing ``s`` at step ``j`` and reusing it through step ``i`` is ``cum[i, j] =
  sum_{r=j..i} e[r, j]``, and a dynamic programme over ``C[k, i]`` (the least cost of steps
  ``0 .. i-1`` with ``k`` computations, the first at step 0) chooses the ``K`` steps
  (:func:`dp_schedule`).

flowdit counts steps per **model call** (``ctx.step``; docs/acceleration.md), which is the
reference's sampler step for Euler, its only solver. ``k = N`` (or ``interval = 1``) computes
``s`` at every call and reproduces the uncached sampler bit for bit. The policy is the
context's stack owner: ``DDT.forward`` hands it the computation of ``s``
(``encoder_state(model, compute, tokens, ctx)``); on any other model it refuses by name.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flowdit.errors import ConfigError

from .base import BlockPolicyBase, PolicyStats, _choice, _positive_int, step_of

__all__ = ["DDTShare", "SHARE_SCHEDULES", "dp_schedule", "encoder_similarity", "schedule_cost", "uniform_schedule"]

SHARE_SCHEDULES = ("uniform", "dp")


def uniform_schedule(num_calls: int, interval: int) -> list[int]:
    """The calls ``i < num_calls`` with ``i % interval == 0`` (the reference's ``state_refresh_rate``)."""
    return [i for i in range(num_calls) if i % interval == 0]


def encoder_similarity(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean per-token cosine similarity of encoder states, ``[N, N]`` float64.

    ``states[i]`` is ``s`` of call ``i``, ``[B, L, D]`` (every call the same shape). As
    ``sharing_dp``: each token's ``D``-vector is L2-normalised and ``sim[i, j]`` is the mean over
    the ``B L`` tokens of ``<s_i, s_j>``; computed as one ``[N, B L D]`` Gram matrix divided by
    ``B L`` (the same number as the reference's per-token ``bmm`` and mean, in float64).
    """
    if not states:
        raise ValueError("encoder_similarity needs at least one state")
    x = torch.stack([s.detach().to("cpu", torch.float64) for s in states])  # [N, B, L, D]
    n, d = x.shape[0], x.shape[-1]
    x = F.normalize(x.reshape(n, -1, d), dim=-1)
    tokens = x.shape[1]
    x = x.reshape(n, -1)
    return (x @ x.T) / tokens


def _cumulative(error) -> np.ndarray:
    """``cum[i, j] = sum_{r=j..i} e[r, j]`` for ``j < i`` (diagonal and upper part as given),
    summed row by row in the reference's order."""
    e = np.array(error, dtype=np.float64, copy=True)
    for i in range(1, len(e)):
        e[i, :i] = e[i - 1, :i] + e[i, :i]
    return e


def dp_schedule(error, k: int) -> list[int]:
    """The ``k`` calls (ascending, the first 0) at which to compute the encoder state, chosen
    by the reference's dynamic programme (``tools/dp.py``; ``sharing_dp`` in
    ``sharing_sampling.py``) on the error matrix ``error [N, N]`` (``1 - sim``).

    With ``cum`` from :func:`_cumulative` (the error of computing at ``j`` and reusing
    through ``i``): ``C[1, i] = cum[i-1, 0]``; ``C[m, i] = min_{m-1 <= j < i} C[m-1, j] +
    cum[i-1, j]`` for ``m = 2 .. k``, ``i = m .. N`` (ties to the smallest ``j``, as the
    reference's strict ``<``); the schedule is traced back from ``C[k, N]``.
    """
    cum = _cumulative(error)
    n = cum.shape[0]
    if cum.shape != (n, n) or n == 0:
        raise ValueError(f"error must be a square [N, N] matrix, got shape {cum.shape}")
    if isinstance(k, bool) or not 1 <= int(k) <= n:
        raise ValueError(f"k must lie in 1..{n}, got {k!r}")
    k = int(k)
    C = np.zeros((k + 1, n + 1))
    P = np.full((k + 1, n + 1), -1, dtype=np.int64)
    C[1, 1:] = cum[:, 0]
    P[1, 1:] = 0
    for m in range(2, k + 1):
        for i in range(m, n + 1):
            cand = C[m - 1, m - 1:i] + cum[i - 1, m - 1:i]
            j = int(np.argmin(cand))
            C[m, i] = cand[j]
            P[m, i] = m - 1 + j
    steps = [n]
    for m in range(k, 0, -1):
        steps.append(int(P[m, steps[-1]]))
    steps.reverse()
    return steps[:-1]


def schedule_cost(error, steps: Sequence[int]) -> float:
    """The DP's objective for a schedule: ``sum_a cum[r_{a+1} - 1, r_a]`` over the segments
    ``[r_a, r_{a+1})`` of ``steps`` (ascending, starting at 0; the last segment ends at ``N``)."""
    cum = _cumulative(error)
    bounds = [*steps, cum.shape[0]]
    return float(sum(cum[bounds[a + 1] - 1, bounds[a]] for a in range(len(steps))))


def _parse_steps(value: Any) -> tuple[int, ...]:
    """``"0/3/7"`` (or one integer) -> ``(0, 3, 7)``; ``""`` -> ``()``."""
    if isinstance(value, bool):
        raise ConfigError(f"ddt_share: recompute must be call indices like 0/3/7, got {value!r}")
    if isinstance(value, int):
        parts = [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, str):
        try:
            parts = [int(p) for p in value.split("/") if p.strip()]
        except ValueError:
            raise ConfigError(f"ddt_share: recompute must be call indices like 0/3/7, got {value!r}") from None
    else:
        raise ConfigError(f"ddt_share: recompute must be call indices like 0/3/7, got {value!r}")
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in parts):
        raise ConfigError(f"ddt_share: recompute must hold call indices >= 0, got {value!r}")
    return tuple(sorted(set(parts)))


class DDTShare(BlockPolicyBase):
    """Compute a DDT's encoder state on a schedule of model calls and reuse it in between.

    Args:
        interval: uniform schedule: compute ``s`` at calls ``i % interval == 0`` (the
            reference's ``state_refresh_rate``; 1 = every call, exact). With
            ``schedule="dp"`` and ``k = 0``: ``K = int(N / interval)`` as the reference.
        schedule: ``"uniform"`` (default) or ``"dp"`` (the reference's dynamic programme on a
            calibration trajectory; :meth:`calibrate`, run by ``flowdit.inference.generate``
            through :meth:`prepare` for each sampling setting).
        k: dp: the number of encoder computations ``K`` (0: from ``interval``); ``K >= N``
            computes at every call.
        recompute: an explicit schedule, call indices ``"0/3/7"`` (e.g. a printed dp schedule);
            replaces ``interval`` / ``k`` and needs no calibration.
        calib: dp: template samples of the calibration trajectory (8 in the reference).
        seed: dp: seed of the template noise and labels (0 in the reference).
        cfg: ``"batched"`` (default, as the reference: one state for the doubled CFG batch)
            or ``"split"`` (one state per branch; calibration uses the conditional branch).

    A call whose branch has no state yet (a new batch shape) computes ``s`` whatever the
    schedule. ``stats.full_calls`` counts the calls that ran the encoder; ``block_evals``
    the fraction of the blocks run (the decoder's share on every call).
    """

    name = "ddt_share"

    def __init__(self, interval: int = 1, schedule: str = "uniform", k: int = 0, recompute: Any = "",
                 calib: int = 8, seed: int = 0, cfg: str = "batched"):
        super().__init__(cfg=cfg)
        self.interval = _positive_int(self.name, "interval", interval)
        self.schedule = _choice(self.name, "schedule", schedule, SHARE_SCHEDULES)
        self.k = _positive_int(self.name, "k", k, 0)
        self._given = _parse_steps(recompute) if recompute not in ("", None) else ()
        self.recompute = "/".join(map(str, self._given))
        self.calib = _positive_int(self.name, "calib", calib)
        self.seed = _positive_int(self.name, "seed", seed, 0)
        if self.k and self.schedule != "dp":
            raise ConfigError(f"{self.name}: k (the number of encoder computations) applies to schedule=dp; "
                              "the uniform schedule takes interval")
        if self._given and (self.k or self.interval != 1):
            raise ConfigError(f"{self.name}: recompute gives the schedule; leave interval and k unset")
        self._dp: Optional[dict] = None
        self._dp_key: Any = None
        self._recording: Optional[list] = None

    def params(self) -> dict:
        """The parameters that define the schedule (for result tables and the repr)."""
        if self._given:
            out = {"recompute": self.recompute}
        elif self.schedule == "dp":
            out = {"schedule": "dp", "k": self.k, "interval": self.interval, "calib": self.calib, "seed": self.seed}
        else:
            out = {"interval": self.interval}
        out["cfg"] = self.cfg_mode
        return out

    # -- schedule ------------------------------------------------------------------------

    @property
    def dp_steps(self) -> Optional[list[int]]:
        """The calibrated dp schedule (call indices), or ``None`` before :meth:`calibrate`."""
        return None if self._dp is None else list(self._dp["steps"])

    @property
    def similarity(self) -> Optional[torch.Tensor]:
        """The calibration's ``[N, N]`` similarity matrix (:func:`encoder_similarity`), or ``None``."""
        return None if self._dp is None else self._dp["similarity"]

    def _computes(self, ctx: Any) -> bool:
        """Whether the schedule computes ``s`` at this call."""
        step = step_of(ctx)
        if self._given:
            return step in self._given
        if self.schedule == "uniform":
            return step % self.interval == 0
        if self._dp is None:
            raise ConfigError(f"{self!r} has no schedule yet: sample through flowdit.inference.generate (which "
                              "calibrates it) or call policy.calibrate(model, run_once, shape) first")
        n = getattr(ctx, "num_steps", None)
        if n is not None and n != self._dp["calls"]:
            raise ConfigError(f"{self!r} was calibrated for {self._dp['calls']} model calls, this sampling makes "
                              f"{n}; calibrate it for this setting")
        return step in self._dp["set"]

    def calibrate(self, model: Any, run_once: Callable[[torch.Tensor, torch.Tensor], Any],
                  shape: Sequence[int]) -> list[int]:
        """Choose the dp schedule on a calibration trajectory, as ``sharing_dp``.

        ``run_once(labels [calib], noise [calib, *shape])`` must run one sampling call of the
        setting to be accelerated with this policy in its step context (``generate`` passes
        one); during it every call computes ``s`` and the states are recorded. Template noise
        ``randn`` and labels ``randint(0, num_classes)`` come from CPU generators seeded with
        ``seed``. ``K = k`` (or ``int(N / interval)``), clipped to ``1 .. N``. Returns the
        schedule, also kept in ``dp_steps`` (and the similarity in ``similarity``); the
        policy's statistics are left as they were.
        """
        _require_ddt(self, model)
        noise = torch.randn((self.calib, *shape), generator=torch.Generator().manual_seed(self.seed))
        labels = torch.randint(0, model.num_classes, (self.calib,), generator=torch.Generator().manual_seed(self.seed))
        stats, self.stats, self._recording = self.stats, PolicyStats(), []
        try:
            run_once(labels, noise)
            records = self._recording
        finally:
            self._recording, self.stats = None, stats
            self.reset()
        if not records:
            raise ConfigError(f"{self!r}: the calibration run made no model call")
        rows = min(s.shape[0] for s in records)
        # A guidance interval mixes 2B-row (conditional rows first) and B-row calls.
        sim = encoder_similarity([s[:rows] for s in records])
        n = len(records)
        k = min(max(self.k or int(n / self.interval), 1), n)
        steps = dp_schedule((1.0 - sim).numpy(), k)
        self._dp = {"steps": steps, "set": frozenset(steps), "calls": n, "k": k, "similarity": sim}
        return steps

    def prepare(self, model: Any, run_once: Callable[[torch.Tensor, torch.Tensor], Any], shape: Sequence[int],
                key: Any = None) -> None:
        """Calibrate the dp schedule unless it is calibrated for ``key`` already (the sampling
        setting; ``flowdit.inference.generate`` calls this once per call). A no-op for the
        uniform and explicit schedules."""
        if self.schedule != "dp" or self._given:
            _require_ddt(self, model)
            return
        if self._dp is not None and key is not None and key == self._dp_key:
            return
        self.calibrate(model, run_once, shape)
        self._dp_key = key

    # -- the stack hook ------------------------------------------------------------------

    def encoder_state(self, model: Any, compute: Callable[[], torch.Tensor], tokens: torch.Tensor,
                      ctx: Any) -> torch.Tensor:
        """``s [B, N, D]`` for this model call: ``compute()`` on a scheduled call (or when the
        branch has no state), else the branch's last ``s``. ``tokens [B, N, C p p]`` (the
        patches) key the branch's state by shape."""
        self.stats.calls += 1
        if self._recording is not None:
            s = compute()
            if getattr(ctx, "branch", "cond") != "uncond":
                self._recording.append(s.detach())
            self._account(model, tokens, True)
            return s
        st = self.state(ctx, tokens)
        full = "s" not in st or self._computes(ctx)
        if full:
            st["s"] = compute()
        self._account(model, tokens, full)
        return st["s"]

    def _account(self, model: Any, tokens: torch.Tensor, full: bool) -> None:
        cfg = model.config
        rows, n = tokens.shape[0], tokens.shape[1]
        enc, dec = cfg.encoder_depth, cfg.depth - cfg.encoder_depth
        self.stats.block_evals += (dec + (enc if full else 0)) / cfg.depth
        flops = dec * model.decoder_block_flops(n) + (enc * model.encoder_block_flops(n) if full else 0)
        self.stats.flops += rows * flops
        if full:
            self.stats.full_calls += 1

    def run(self, model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Refuses: a model that calls ``run`` has one block stack, not a DDT's encoder and decoder."""
        _require_ddt(self, model)
        raise ConfigError(f"--accel {self!r}: {type(model).__name__} called the block stack of a DiT")


def _require_ddt(policy: DDTShare, model: Any) -> None:
    if not callable(getattr(model, "run_encoder", None)):
        raise ConfigError(f"--accel {policy!r} shares a DDT's encoder state; {type(model).__name__} has no "
                          "condition encoder (train a DDT: model.name=DDT-mnist, docs/ddt.md)")
