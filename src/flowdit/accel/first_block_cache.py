"""First-block caches: decide from a cheap early signal whether to reuse the rest.

* ``FirstBlockCache`` (cache-dit / ParaAttention "FBCache"): run the first block, compare
  its residual with the one stored at the last full call by the relative L1 distance
  ``mean|r_1 - r_1^cached| / mean|r_1^cached|``; below ``threshold`` the other blocks are
  replaced by their cached residual, otherwise they run and the cache is refreshed.
* ``TeaCache`` (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video
  Diffusion Model", arXiv 2411.19108): the signal is the first block's *modulated input*
  ``modulate(LN(x), shift, scale)``, which carries the timestep embedding; its relative
  L1 change between consecutive calls, optionally rescaled by a polynomial fitted on one
  calibration run (the paper's eq. 5-6), is **accumulated**; while the sum stays below
  ``threshold`` the whole stack's cached residual is reused, and the sum is reset at
  every full call. ``calibrate_teacache`` fits the rescaling polynomial from one sample.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from flowdit.errors import ConfigError
from flowdit.models.layers import modulate

from .base import BlockPolicyBase, _in_range, _positive_int, step_of

__all__ = ["FirstBlockCache", "TeaCache", "calibrate_teacache", "rel_l1"]


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L1 distance ``mean|a - b| / mean|b|`` (0 when ``b`` is all zero and ``a == b``)."""
    den = b.abs().mean()
    num = (a - b).abs().mean()
    return float(num / den) if float(den) > 0 else (0.0 if float(num) == 0 else float("inf"))


class FirstBlockCache(BlockPolicyBase):
    """Reuse the residual of blocks ``1..depth-1`` while the first block's residual is stable.

    Args:
        threshold: relative L1 change of the first block's residual against the last
            full call under which the cache is used (0 = always full).
        warmup: calls that always run in full.
        max_skip: at most this many cached calls in a row (0 = unbounded).
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "fbcache"

    def __init__(self, threshold: float = 0.08, warmup: int = 1, max_skip: int = 0, cfg: str = "batched"):
        super().__init__(cfg)
        self.threshold = _in_range(self.name, "threshold", threshold, 0.0, float("inf"))
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self.max_skip = _positive_int(self.name, "max_skip", max_skip, 0)

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        h1 = self.run_blocks(model, tokens, c_act, ctx, 0, 1)
        r1 = h1 - tokens
        ref = st.get("r1")
        skip_ok = not self.max_skip or st.get("skipped", 0) < self.max_skip
        if ref is not None and step_of(ctx) >= self.warmup and skip_ok:
            change = rel_l1(r1, ref)
            st["last_change"] = change
            if change < self.threshold:
                st["skipped"] = st.get("skipped", 0) + 1
                return h1 + st["rest"]
        out = self.run_blocks(model, h1, c_act, ctx, 1, None)
        st["r1"], st["rest"], st["skipped"] = r1, out - h1, 0
        self.stats.full_calls += 1
        return out


class TeaCache(BlockPolicyBase):
    """Accumulated, rescaled change of the first block's modulated input (TeaCache).

    Args:
        threshold: the accumulated (rescaled) relative L1 change that forces a full call
            (0 = always full). The paper's settings are 0.1-0.3 for their models.
        coeffs: rescaling polynomial, highest power first, ``"c4/c3/c2/c1/c0"`` in a spec;
            empty = identity. ``calibrate_teacache`` fits it.
        warmup: calls that always run in full.
        cfg: ``"batched"`` or ``"split"``.
    """

    name = "teacache"

    def __init__(self, threshold: float = 0.1, coeffs: str | tuple = "", warmup: int = 1, cfg: str = "batched"):
        super().__init__(cfg)
        self.threshold = _in_range(self.name, "threshold", threshold, 0.0, float("inf"))
        self.coeffs = _parse_coeffs(coeffs)
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self._recording: list[tuple[float, float]] | None = None

    def params(self) -> dict:
        p = super().params()
        p["coeffs"] = "/".join(f"{c:.6g}" for c in self.coeffs)
        return p

    def rescale(self, change: float) -> float:
        """The calibrated estimate of the output change for an input change ``change``."""
        return float(np.polyval(self.coeffs, change)) if self.coeffs else change

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        block = model.blocks[0]
        shift, scale = block.modulation(c_act)[:2]
        sig = modulate(block.norm1(tokens), shift, scale)
        prev = st.get("sig")
        st["sig"] = sig
        if prev is not None and self._recording is None:
            st["acc"] = st.get("acc", 0.0) + self.rescale(rel_l1(sig, prev))
            if step_of(ctx) >= self.warmup and st["acc"] < self.threshold:
                return tokens + st["residual"]
        out = self.run_blocks(model, tokens, c_act, ctx)
        if self._recording is not None and prev is not None:
            self._recording.append((rel_l1(sig, prev), rel_l1(out, st["out"])))
        st["residual"], st["out"], st["acc"] = out - tokens, out, 0.0
        self.stats.full_calls += 1
        return out


def _parse_coeffs(coeffs) -> tuple:
    if isinstance(coeffs, str):
        parts = [c for c in coeffs.replace(";", "/").split("/") if c.strip()]
    else:
        parts = list(coeffs)
    try:
        return tuple(float(c) for c in parts)
    except ValueError:
        raise ConfigError(f"teacache: coeffs must be numbers separated by '/', got {coeffs!r}") from None


def calibrate_teacache(policy: TeaCache, run_once: Callable[[], object], degree: int = 4) -> tuple:
    """Fit ``policy.coeffs`` from one uncached sampling run (TeaCache, sec. 4.3).

    ``run_once()`` must sample (one image is enough) with ``policy`` active; during the
    call every model call runs in full and the pairs (relative L1 change of the first
    block's modulated input, relative L1 change of the stack output) between consecutive
    calls are recorded; a degree-``degree`` polynomial maps the first to the second.
    Returns the coefficients (highest power first).
    """
    policy._recording = []
    try:
        run_once()
        pairs = policy._recording
    finally:
        policy._recording = None
    if len(pairs) <= degree:
        raise ConfigError(f"teacache calibration needs more than {degree} model calls, got {len(pairs) + 1}")
    x, y = np.array(pairs).T
    policy.coeffs = tuple(float(c) for c in np.polyfit(x, y, degree))
    return policy.coeffs
