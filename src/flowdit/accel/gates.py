"""Gates of the training-free caches: per model call, run the stack in full or skip it.

A cache (``flowdit.accel.cache.Cache``) is one gate combined with one reuse
(``flowdit.accel.reuses``). On every model call the cache asks its gate whether the
call may be skipped; a skipped call's stack output comes from the reuse, a full call
runs the blocks and the reuse records what it will need.

The gate protocol (``Gate``):

* ``prefix``: the number of leading blocks the gate needs run before it decides (0 or
  1 here). The cache runs ``blocks[:prefix]`` on every call (accounted like any other
  block run) and hands their output to the gate as ``call.hidden``; the reuse then
  covers blocks ``prefix .. L-1`` only, continuing from ``call.hidden`` on a full call.
* ``skip(call, st, ready) -> bool``: ``True`` = the reuse supplies the output. ``ready``
  says whether the reuse holds data (it is ``False`` until the first full call); a gate
  must answer ``False`` then. ``st`` is the branch's state dict, shared with the reuse:
  a gate keeps its keys apart from the reuse's (``REUSE_KEYS`` in ``reuses``).
* ``full(call, st, out)``: called after a full call with the stack output ``out``:
  record what the next decisions need.

Gates here: ``ScheduleGate`` (FORA's count-down interval, every N-th from the first
call, or N calls after the last full one; with a warm-up), ``FirstBlockGate`` (FBCache:
first block's residual change), ``TeaCacheGate`` (TeaCache: accumulated rescaled change
of block 0's modulated input) and ``ConfidenceGate`` (CG-Taylor: error of the first
block's own Taylor forecast). The papers are cited in the modules that define the named
combinations (``fora``, ``first_block_cache``, ``gated_taylor``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from flowdit.errors import ConfigError
from flowdit.models.layers import modulate

from .base import _choice, _flag, _in_range, _positive_int
from .forecast import FORMS, build_history

if TYPE_CHECKING:
    from .cache import Call

__all__ = ["Gate", "ScheduleGate", "FirstBlockGate", "TeaCacheGate", "ConfidenceGate", "GATES", "fora_full_call",
           "rel_l1", "rel_l1_per_sample", "first_block_modulated_input", "ctx_batched", "gate_error", "parse_coeffs",
           "SCHEDULES", "FEATURES", "NORMS"]

SCHEDULES = ("fora", "start", "since")
FEATURES = ("output", "residual")
NORMS = ("l1", "l2")

Check = Callable[[str, str, Any], Any]
"""A parameter check ``check(owner, key, value) -> value``: the validated value, or a
``ConfigError`` naming ``owner`` and ``key``."""


def _nonneg_int(owner: str, key: str, value: Any) -> int:
    return _positive_int(owner, key, value, 0)


def _pos_int(owner: str, key: str, value: Any) -> int:
    return _positive_int(owner, key, value)


def _threshold(owner: str, key: str, value: Any) -> float:
    return _in_range(owner, key, value, 0.0, float("inf"))


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(owner, key, value):
        return _choice(owner, key, value, choices)
    return check


class Gate:
    """Decides, per model call, whether the block stack runs in full (see module).

    Subclasses set ``name`` (the ``gate=`` word of a ``cache:`` spec), ``prefix``,
    ``spec`` (``{key: (default, check)}``: the keys a ``cache:`` spec may give it, in
    order) and implement ``skip`` (and ``full`` where they keep state).
    """

    name = ""
    prefix = 0
    """Leading blocks the cache runs before ``skip`` is asked (their output: ``call.hidden``)."""
    requires: frozenset[str] = frozenset()
    spec: dict[str, tuple[Any, Check]] = {}

    @classmethod
    def from_spec(cls, **values: Any) -> "Gate":
        """The gate from validated ``cache:`` spec values (one per key of ``spec``)."""
        return cls(**values)

    def skip(self, call: "Call", st: dict, ready: bool) -> bool:
        """Whether this call reuses (``True``) instead of running the stack in full."""
        raise NotImplementedError

    def full(self, call: "Call", st: dict, out: torch.Tensor) -> None:
        """Record what later decisions need after a full call (stack output ``out [B, N, D]``)."""


# -- schedules (FORA, TaylorSeer, Delta-DiT) ----------------------------------------------


def fora_full_call(step: int, num_calls: int | None, interval: int, schedule: str = "fora") -> bool:
    """Whether model call ``step`` (0-based, counting up) runs in full under FORA.

    ``schedule="fora"``: the reference's rule on the reverse index ``i = num_calls - 1 -
    step``: full iff ``i == num_calls - 1`` (the first call) or ``i % interval == 0``.
    Without a known number of calls (adaptive solvers) and for ``schedule="start"``:
    full iff ``step % interval == 0``.
    """
    if schedule == "fora" and num_calls is not None:
        i = num_calls - 1 - step
        return i == num_calls - 1 or i % interval == 0
    return step % interval == 0


class ScheduleGate(Gate):
    """A fixed schedule of full calls, blind to the features.

    Call ``s`` runs in full when ``s < warmup``, when the reuse holds nothing yet, or
    by ``schedule``: ``"fora"`` FORA's count-down rule and ``"start"`` every
    ``interval``-th call from the first (``fora_full_call``); ``"since"`` once
    ``interval`` calls have passed since the last full call (TaylorSeer's ``cal_type``
    and Delta-DiT: after a warm-up of ``w`` calls, full at ``w - 1 + k N``). Stores
    ``st["last_full"]`` (``"since"`` only).
    """

    name = "schedule"
    spec = {"interval": (3, _pos_int), "schedule": ("fora", _one_of(SCHEDULES)), "warmup": (0, _nonneg_int)}

    def __init__(self, interval: int = 3, schedule: str = "fora", warmup: int = 0):
        self.interval, self.schedule, self.warmup = interval, schedule, warmup

    def skip(self, call, st, ready):
        s = call.step
        if not ready or s < self.warmup:
            return False
        if self.schedule == "since":
            last = st.get("last_full")
            return last is not None and s - last < self.interval
        return not fora_full_call(s, call.num_steps, self.interval, self.schedule)

    def full(self, call, st, out):
        if self.schedule == "since":
            st["last_full"] = call.step


# -- first-block residual (FBCache) -------------------------------------------------------


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L1 distance ``mean|a - b| / mean|b|`` (0 when ``b`` is all zero and ``a == b``)."""
    den = b.abs().mean()
    num = (a - b).abs().mean()
    return float(num / den) if float(den) > 0 else (0.0 if float(num) == 0 else float("inf"))


class FirstBlockGate(Gate):
    """FBCache's gate: the change of the first block's residual since the last full call.

    ``prefix = 1``: block 0 runs on every call; ``r_1 = h_1 - x`` (``[B, N, D]``) is
    compared with the one of the last full call, ``mean|r_1 - r_1^full| / mean|r_1^full|``
    (``st["last_change"]``); below ``threshold`` the call is skipped. Calls ``s < warmup``
    run in full, and with ``max_skip > 0`` at most that many calls in a row are skipped.
    State: ``r1``, ``skipped``, ``last_change``.
    """

    name = "fbcache"
    prefix = 1
    spec = {"threshold": (0.08, _threshold), "warmup": (1, _nonneg_int), "max_skip": (0, _nonneg_int)}

    def __init__(self, threshold: float = 0.08, warmup: int = 1, max_skip: int = 0):
        self.threshold, self.warmup, self.max_skip = threshold, warmup, max_skip

    def skip(self, call, st, ready):
        r1 = call.signal = call.hidden - call.tokens
        ref = st.get("r1")
        skip_ok = not self.max_skip or st.get("skipped", 0) < self.max_skip
        if ready and ref is not None and call.step >= self.warmup and skip_ok:
            change = rel_l1(r1, ref)
            st["last_change"] = change
            if change < self.threshold:
                st["skipped"] = st.get("skipped", 0) + 1
                return True
        return False

    def full(self, call, st, out):
        st["r1"], st["skipped"] = call.signal, 0


# -- modulated-input change (TeaCache) ----------------------------------------------------


def rel_l1_per_sample(a: torch.Tensor, b: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """``mean|a - b| / mean|b|`` per sample: ``[G]`` for ``a, b`` of ``[R, ...]``.

    A sample is one row, or with ``batched`` (both CFG branches in one batch, rows
    ``[cond_0..cond_{G-1}, uncond_0..uncond_{G-1}]``) the two rows ``i`` and ``i + G``
    together: the value a sampling run of that one sample alone would give.
    """
    rows = a.shape[0]
    if batched and rows % 2 == 0:
        def group(t):
            return t.reshape(2, rows // 2, -1).transpose(0, 1).reshape(rows // 2, -1)
    else:
        def group(t):
            return t.reshape(rows, -1)
    a, b = group(a).float(), group(b).float()
    return (a - b).abs().mean(dim=1) / b.abs().mean(dim=1)


def first_block_modulated_input(model: Any, tokens: torch.Tensor, c_act: torch.Tensor) -> torch.Tensor:
    """TeaCache's signal: block 0's normalised, modulated input ``modulate(LN(x), shift, scale)``.

    ``tokens [B, N, D]``, ``c_act [B, D]`` (the activated conditioning); a model adapter
    whose first block is built differently supplies ``model.modulated_input(tokens, c_act)``
    (diffusers' SD3 and FLUX: ``transformer_blocks[0].norm1`` on the image tokens, as in
    TeaCache4FLUX).
    """
    own = getattr(model, "modulated_input", None)
    if callable(own):
        return own(tokens, c_act)
    block = model.blocks[0]
    shift, scale = block.modulation(c_act)[:2]
    return modulate(block.norm1(tokens), shift, scale)


def ctx_batched(ctx: Any) -> bool:
    """Whether the call runs both CFG branches in one batch (``ctx.branch == "batched"``)."""
    return getattr(ctx, "branch", None) == "batched"


def parse_coeffs(owner: str, key: str, coeffs: Any) -> tuple:
    """TeaCache's rescaling polynomial: numbers separated by ``/`` (or a sequence of numbers)."""
    if isinstance(coeffs, (int, float)) and not isinstance(coeffs, bool):
        parts = [coeffs]
    elif isinstance(coeffs, str):
        parts = [c for c in coeffs.replace(";", "/").split("/") if c.strip()]
    else:
        parts = list(coeffs)
    try:
        return tuple(float(c) for c in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: {key} must be numbers separated by '/', got {coeffs!r}") from None


class TeaCacheGate(Gate):
    """TeaCache's gate: the accumulated, rescaled change of block 0's modulated input.

    ``prefix = 0`` (block 0's modulation and norm are evaluated, the block is not run).
    Per call ``s``: ``m_s = modulate(LN(x_s), shift_msa, scale_msa)`` ``[B, N, D]``
    (``first_block_modulated_input``). The first call, the final one (``s = num_steps - 1``
    where known), the calls ``s < warmup`` and every call while ``recording`` run in full
    and set the accumulator to 0; any other call adds
    ``poly(mean|m_s - m_{s-1}| / mean|m_{s-1}|)`` to it (``m_{s-1}`` is the previous
    call's, skipped or not) and is skipped while the sum stays below ``threshold``, else
    runs in full and restarts the sum from 0. State: ``sig``, ``acc`` (and ``pending``
    while recording calibration pairs, see ``first_block_cache.teacache_pairs``).
    """

    name = "teacache"
    spec = {"threshold": (0.1, _threshold), "coeffs": ("", parse_coeffs), "warmup": (1, _nonneg_int)}

    def __init__(self, threshold: float = 0.1, coeffs: tuple = (), warmup: int = 1):
        self.threshold, self.coeffs, self.warmup = threshold, tuple(coeffs), warmup
        self.recording: list | None = None

    def rescale(self, change: float) -> float:
        """The calibrated estimate of the output change for an input change ``change``."""
        return float(np.polyval(self.coeffs, change)) if self.coeffs else change

    def skip(self, call, st, ready):
        sig = first_block_modulated_input(call.model, call.tokens, call.c_act)
        prev = st.get("sig")
        st["sig"] = sig
        call.signal = (sig, prev)
        s, num_steps = call.step, call.num_steps
        if (prev is None or not ready or s < self.warmup or (num_steps is not None and s == num_steps - 1)
                or self.recording is not None):
            st["acc"] = 0.0
            return False
        st["acc"] += self.rescale(rel_l1(sig, prev))
        if st["acc"] < self.threshold:
            return True
        st["acc"] = 0.0
        return False

    def full(self, call, st, out):
        if self.recording is not None:
            sig, prev = call.signal
            st["pending"] = (call.step, None if prev is None else rel_l1_per_sample(sig, prev, ctx_batched(call.ctx)))


# -- forecast confidence (CG-Taylor) ------------------------------------------------------


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


class ConfidenceGate(Gate):
    """CG-Taylor's gate: the error of the first block's own Taylor forecast.

    ``prefix = 1``: block 0 runs on every call; its feature ``f_1 = h_1`` (``feature =
    "output"``) or ``h_1 - x`` (``"residual"``), ``[B, N, D]``, is compared with its
    forecast from the full calls so far (order ``first_order``, ``form`` as in
    ``forecast.build_history``): ``e(s) = gate_error(f_1_hat(s), f_1, norm)``
    (``st["last_error"]``). The calls ``s < warmup`` and the final call run in full;
    otherwise the call is skipped when ``e(s) < threshold`` (at most ``max_skip`` in a
    row when ``max_skip > 0``). Only full calls extend the history; with ``spaced`` it
    restarts at every warm-up call. State: ``first``, ``skipped``, ``last_error``.
    """

    name = "confidence"
    prefix = 1
    spec = {"threshold": (0.008, _threshold), "first_order": (3, _nonneg_int), "warmup": (3, _nonneg_int),
            "form": ("paper", _one_of(FORMS)), "feature": ("output", _one_of(FEATURES)),
            "norm": ("l1", _one_of(NORMS)), "max_skip": (0, _nonneg_int), "spaced": (False, _flag)}

    def __init__(self, threshold: float = 0.008, first_order: int = 3, warmup: int = 3, form: str = "paper",
                 feature: str = "output", norm: str = "l1", max_skip: int = 0, spaced: bool = False):
        self.threshold, self.first_order, self.warmup = threshold, first_order, warmup
        self.form, self.feature, self.norm, self.max_skip, self.spaced = form, feature, norm, max_skip, spaced

    def skip(self, call, st, ready):
        s, num_steps = call.step, call.num_steps
        h1 = call.hidden
        f1 = call.signal = h1 - call.tokens if self.feature == "residual" else h1
        first = st.get("first")
        forced = not ready or first is None or s < self.warmup or (num_steps is not None and s == num_steps - 1)
        if not forced and (not self.max_skip or st["skipped"] < self.max_skip):
            err = gate_error(first.predict(s), f1, self.norm)
            st["last_error"] = err
            if err < self.threshold:
                st["skipped"] += 1
                return True
        return False

    def full(self, call, st, out):
        s = call.step
        first = st.get("first")
        if first is None or (self.spaced and s < self.warmup):
            first = st["first"] = build_history(self.form, self.first_order)
        first.update(s, call.signal)
        st["skipped"] = 0


GATES: dict[str, type[Gate]] = {cls.name: cls for cls in (ScheduleGate, FirstBlockGate, TeaCacheGate, ConfidenceGate)}
"""The gates a ``cache:gate=NAME,...`` spec may name."""
