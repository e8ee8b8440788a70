"""First-block caches: decide from a cheap early signal whether to reuse the rest.

* ``FirstBlockCache`` (cache-dit / ParaAttention "FBCache"): run the first block, compare
  its residual with the one stored at the last full call by the relative L1 distance
  ``mean|r_1 - r_1^cached| / mean|r_1^cached|``; below ``threshold`` the other blocks are
  replaced by their cached residual, otherwise they run and the cache is refreshed.
* ``TeaCache`` (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video
  Diffusion Model", arXiv 2411.19108; the authors' code ali-vilab/TeaCache): the signal is
  the first block's *modulated input* ``modulate(LN(x), shift_msa, scale_msa)``, which
  carries the timestep embedding. Its relative L1 change against the previous call,
  rescaled by a model-specific polynomial, is **accumulated**; while the sum stays below
  ``threshold`` the cached residual of the whole stack is added to the current input,
  otherwise the stack runs, its residual is cached and the sum restarts from 0. The first
  and the final call always run in full. ``calibrate_teacache`` fits the polynomial.

As caches: FBCache is the gate ``FirstBlockGate`` (which runs block 0 itself) with the
reuse ``ResidualReuse`` of blocks ``1..L-1``; TeaCache is the gate ``TeaCacheGate`` (which
reads block 0's modulated input without running the block) with ``ResidualReuse`` of the
whole stack.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from flowdit.errors import ConfigError

from .base import _in_range, _positive_int
from .cache import Cache
from .gates import (FirstBlockGate, TeaCacheGate, ctx_batched, first_block_modulated_input, parse_coeffs, rel_l1,
                    rel_l1_per_sample)
from .reuses import ResidualReuse

__all__ = ["FirstBlockCache", "TeaCache", "calibrate_teacache", "calibrate_teacache_model",
           "fit_teacache_coeffs", "rel_l1", "rel_l1_per_sample", "teacache_pairs", "first_block_modulated_input",
           "ctx_batched"]


class FirstBlockCache(Cache):
    """Reuse the residual of blocks ``1..depth-1`` while the first block's residual is stable.

    ``FirstBlockGate(threshold, warmup, max_skip)`` + ``ResidualReuse()`` (of blocks 1..L-1).

    Args:
        threshold: relative L1 change of the first block's residual against the last
            full call under which the cache is used (0 = always full).
        warmup: calls that always run in full.
        max_skip: at most this many cached calls in a row (0 = unbounded).
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "fbcache"

    def __init__(self, threshold: float = 0.08, warmup: int = 1, max_skip: int = 0, cfg: str = "batched"):
        super().__init__(cfg=cfg)
        self.threshold = _in_range(self.name, "threshold", threshold, 0.0, float("inf"))
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self.max_skip = _positive_int(self.name, "max_skip", max_skip, 0)
        self.combine(FirstBlockGate(self.threshold, self.warmup, self.max_skip), ResidualReuse())


class TeaCache(Cache):
    """Accumulated, rescaled change of the first block's modulated input (TeaCache).

    ``TeaCacheGate(threshold, coeffs, warmup)`` + ``ResidualReuse()`` (of the whole stack).

    Per model call ``s`` (the authors' ``teacache_forward`` of TeaCache4FLUX,
    TeaCache4HunyuanVideo and Open-Sora): ``m_s = modulate(LN(x_s), shift_msa, scale_msa)``
    of block 0. The first call, the final call (``s = num_steps - 1``, known to fixed-step
    solvers) and the calls ``s < warmup`` run in full and set the accumulator to 0. Any
    other call adds ``poly(mean|m_s - m_{s-1}| / mean|m_{s-1}|)`` to it (``m_{s-1}`` is the
    previous call's, cached or not); if the sum is below ``threshold`` the stack output
    is ``x_s + r``, with ``r`` the residual ``out - in`` of the last full call; otherwise
    the stack runs, ``r`` is replaced and the sum is set to 0. Means run over the whole batch: with
    ``cfg=batched`` both CFG branches share one decision (as Open-Sora's doubled batch),
    with ``cfg=split`` each branch keeps its own accumulator and residual (as Wan2.1's
    even / odd calls).

    Args:
        threshold: the reference's ``rel_l1_thresh`` (0 = always full while the rescaled
            changes are positive); model-specific: 0.1 and 0.2 in the authors' video
            experiments (``eval/teacache/experiments``), 0.25-0.8 on FLUX, 0.1-0.15 on
            HunyuanVideo.
        coeffs: rescaling polynomial ``poly``, highest power first, ``"c4/c3/c2/c1/c0"``
            in a spec; empty = identity (no rescaling). ``calibrate_teacache`` fits it.
        warmup: calls that always run in full (the first always does; 1 = the reference).
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "teacache"

    def __init__(self, threshold: float = 0.1, coeffs: str | tuple = "", warmup: int = 1, cfg: str = "batched"):
        super().__init__(cfg=cfg)
        self.threshold = _in_range(self.name, "threshold", threshold, 0.0, float("inf"))
        coeffs = parse_coeffs(self.name, "coeffs", coeffs)
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self.combine(TeaCacheGate(self.threshold, coeffs, self.warmup), ResidualReuse())

    @property
    def coeffs(self) -> tuple:
        """The rescaling polynomial, highest power first (the gate's; settable)."""
        return self._gate.coeffs

    @coeffs.setter
    def coeffs(self, value) -> None:
        self._gate.coeffs = tuple(value)

    @property
    def _recording(self) -> list | None:
        # Calibration pairs are collected by the gate while this is a list.
        return self._gate.recording

    @_recording.setter
    def _recording(self, value: list | None) -> None:
        self._gate.recording = value

    def params(self) -> dict:
        return {"threshold": self.threshold, "coeffs": "/".join(f"{c:.6g}" for c in self.coeffs),
                "warmup": self.warmup, "cfg": self.cfg_mode}

    def rescale(self, change: float) -> float:
        """The calibrated estimate of the output change for an input change ``change``."""
        return self._gate.rescale(change)

    def after_output(self, model, v: torch.Tensor, ctx) -> torch.Tensor:
        """While calibrating: pair the input change of this call with its output change.

        ``v [R, C, H, W]`` is the model's output (the velocity of every row, before the
        guidance combination). Outside calibration ``v`` passes through untouched.
        """
        if self._recording is None:
            return v
        st = self._states.get(getattr(ctx, "branch", "cond") or "cond")
        if st is None or "pending" not in st:
            return v
        s, x_change = st.pop("pending")
        prev_v = st.get("v")
        st["v"] = v.detach()
        if x_change is not None and prev_v is not None and prev_v.shape == v.shape:
            y_change = rel_l1_per_sample(v, prev_v, ctx_batched(ctx))
            self._recording.append((s, x_change.cpu().numpy(), y_change.cpu().numpy()))
        return v


def teacache_pairs(policy: TeaCache, run_once: Callable[[], object]) -> np.ndarray:
    """The calibration data of TeaCache from uncached sampling (``[P, 3]`` float64).

    ``run_once()`` must sample with ``policy`` active; while it runs every model call is
    computed in full, and for every call ``s >= 1`` and every sample one row
    ``(s, x, y)`` is recorded: ``x`` the relative L1 change of block 0's modulated input
    and ``y`` that of the model output, both against the previous call of the same
    sample (``rel_l1_per_sample``; the two CFG rows of a sample count together when they
    share a batch). These are the pairs the authors fit (ali-vilab/TeaCache issue #2:
    the modulated noisy input and the model output of every step of uncached runs).
    """
    policy._recording = []
    try:
        run_once()
        records = policy._recording
    finally:
        policy._recording = None
    rows = [np.stack([np.full(len(x), s, dtype=np.float64), x, y], axis=1) for s, x, y in records]
    return np.concatenate(rows) if rows else np.zeros((0, 3))


def fit_teacache_coeffs(x: np.ndarray, y: np.ndarray, degree: int = 4) -> tuple:
    """Least-squares polynomial ``y ~ poly(x)`` of ``degree`` (``np.polyfit``), highest power first."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) <= degree:
        raise ConfigError(f"teacache calibration needs more than {degree} (input, output) pairs, got {len(x)}")
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def calibrate_teacache(policy: TeaCache, run_once: Callable[[], object], degree: int = 4) -> tuple:
    """Fit ``policy.coeffs`` on the uncached run ``run_once()`` (TeaCache's rescaling).

    Records the pairs of ``teacache_pairs`` and fits a degree-``degree`` polynomial (4 in
    the reference) of the output change against the input change over all of them, as
    ``np.polyfit(x, y, 4)`` in the authors' procedure. Returns the coefficients (highest
    power first), also stored in ``policy.coeffs``.
    """
    pairs = teacache_pairs(policy, run_once)
    policy.coeffs = fit_teacache_coeffs(pairs[:, 1], pairs[:, 2], degree)
    return policy.coeffs


def calibrate_teacache_model(model: torch.nn.Module, labels: torch.Tensor, shape: Sequence[int], *,
                             solver: str = "euler", steps: int = 50, cfg_scale: float = 1.5, shift: float = 1.0,
                             seed: int = 0, batch_size: int = 70, device: torch.device | str = "cpu",
                             amp_dtype: Optional[torch.dtype] = None, degree: int = 4) -> dict:
    """Calibrate TeaCache for ``model`` under one sampling setting; returns a result dict.

    The authors fit on uncached runs of 70 prompts, every step of each; here a prompt
    is a class label: ``labels [N]`` are sampled without caching by
    ``flowdit.inference.generate`` with the given solver, steps, guidance and seed, every
    consecutive pair of model calls of every sample gives one ``(x, y)`` pair
    (``teacache_pairs``), and a degree-``degree`` polynomial is fitted to all of them.
    The polynomial depends on the step count and solver (they set the change per call),
    so calibrate with the setting you sample with.

    Returns a dict: ``coeffs`` (highest power first), ``spec`` (the ``coeffs=`` value of a
    ``teacache`` spec), ``pairs`` (their number), ``samples``, ``r2`` and ``rmse`` of the
    fit, the ranges of ``x`` and ``y``, the settings, and ``data`` (the ``[P, 3]`` pairs
    ``(call, x, y)`` as a list).
    """
    from flowdit.inference import generate

    policy = TeaCache()

    def run_once():
        generate(model, labels, shape, solver=solver, steps=steps, cfg_scale=cfg_scale, shift=shift, seed=seed,
                 batch_size=batch_size, device=device, amp_dtype=amp_dtype, accel=policy)

    pairs = teacache_pairs(policy, run_once)
    x, y = pairs[:, 1], pairs[:, 2]
    coeffs = fit_teacache_coeffs(x, y, degree)
    resid = y - np.polyval(coeffs, x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {
        "coeffs": list(coeffs),
        "spec": "/".join(f"{c:.6g}" for c in coeffs),
        "degree": degree,
        "pairs": int(len(x)),
        "samples": int(len(labels)),
        "r2": 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
        "rmse": float(np.sqrt((resid**2).mean())),
        "x_range": [float(x.min()), float(x.max())],
        "y_range": [float(y.min()), float(y.max())],
        "settings": {"solver": solver, "steps": steps, "cfg_scale": cfg_scale, "shift": shift, "seed": seed,
                     "precision": "bf16" if amp_dtype == torch.bfloat16 else "fp32"},
        "data": pairs.tolist(),
    }
