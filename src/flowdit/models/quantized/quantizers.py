"""Quantizers: integer codes and their dequantized values, for weights and activations.

Conventions (one per function, stated in its docstring): a weight ``W [out, in]`` is
quantized per output channel (one row, one set of parameters); an activation
``x [..., in]`` per token (one row of the flattened ``[tokens, in]`` matrix), dynamically,
as LRQ-DiT's ``DynamicQuantizer`` does. ``b`` is the bit width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "CLIP_QUANTILES",
    "TWIN_LOG_ETAS",
    "TwinLogWeight",
    "UniformWeight",
    "fake_quant_tokens",
    "quantize_tokens_int8",
    "twin_log_quantize",
    "uniform_quantize",
]

# The clipping grid of LRQ-DiT's twin-log search (``StaticQuantizer.init_quant_params``):
# the upper end of each side's range is this quantile of the row.
CLIP_QUANTILES = (0.98, 0.99, 0.999, 0.9999, 0.99999)
# The offsets eta tried there, in the reference's order (ties keep the first).
TWIN_LOG_ETAS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def _row_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row quantile ``[R, C] -> [R, 1]`` with 'nearest' interpolation (the reference's)."""
    return torch.quantile(x.float(), q=q, dim=1, keepdim=True, interpolation="nearest")


# --------------------------------------------------------------------------- uniform


@dataclass
class UniformWeight:
    """Asymmetric per-channel uniform codes: ``W ~ (q - zero) * scale``.

    ``q [out, in]`` uint8 in ``[0, 2^b - 1]``; ``scale, zero [out, 1]`` float32.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() - self.zero) * self.scale


def _uniform_codes(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> UniformWeight:
    levels = 2**bits - 1
    lo = torch.minimum(lo, torch.zeros_like(lo))  # zero stays exactly representable
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale) + zero, 0, levels)
    return UniformWeight(q.to(torch.uint8), scale.float(), zero.float(), bits)


def uniform_quantize(w: torch.Tensor, bits: int, search: bool = True) -> UniformWeight:
    """Per-output-channel asymmetric uniform quantization of ``W [out, in]`` to ``b`` bits.

    With ``search`` the row's range is clipped to its ``(1 - p, p)`` quantiles for the
    ``p`` in :data:`CLIP_QUANTILES` of the lower and the upper end independently (25
    pairs), keeping the pair of least mean squared error over the whole tensor: the same
    search LRQ-DiT runs for its twin-log quantizer, so the two compare at equal effort.
    Without it the range is the row's min and max.
    """
    w = w.float()
    best, best_err = _uniform_codes(w, w.amin(1, keepdim=True), w.amax(1, keepdim=True), bits), None
    if not search:
        return best
    best_err = torch.mean((best.dequantize() - w) ** 2)
    uppers = {p: _row_quantile(w, p) for p in CLIP_QUANTILES}
    lowers = {p: _row_quantile(w, 1 - p) for p in CLIP_QUANTILES}
    for p_hi in CLIP_QUANTILES:
        for p_lo in CLIP_QUANTILES:
            cand = _uniform_codes(w, lowers[p_lo], uppers[p_hi], bits)
            err = torch.mean((cand.dequantize() - w) ** 2)
            if err < best_err:
                best, best_err = cand, err
    return best


# --------------------------------------------------------------------------- twin-log


@dataclass
class TwinLogWeight:
    """LRQ-DiT's twin-log codes of ``W [out, in]`` (Twin-Log Quantization, sec. 3.2).

    Each sign has its own per-row log-domain grid: ``log2(|w| + eta)`` is quantized with
    ``(delta_pos, zero_pos)`` on the positive entries and ``(delta_neg, zero_neg)`` on the
    negative ones; ``w ~ +-(2^((q + zero) delta) - eta)``. ``q [out, in]`` uint8 holds the
    code of each entry's own side, ``sign [out, in]`` int8 is ``+1, -1`` or ``0`` (an
    exact zero weight, which dequantizes to zero). Positive codes lie in
    ``[0, 2^(b-1) - 1]``, negative ones in ``[0, 2^(b-1)]``: one more level than fits in
    ``b - 1`` bits, exactly as the reference clamps (see :func:`twin_log_quantize`).
    """

    q: torch.Tensor
    sign: torch.Tensor
    delta_pos: torch.Tensor
    zero_pos: torch.Tensor
    delta_neg: torch.Tensor
    zero_neg: torch.Tensor
    eta: float
    bits: int

    def dequantize(self) -> torch.Tensor:
        pos = self.sign > 0
        delta = torch.where(pos, self.delta_pos, self.delta_neg)
        zero = torch.where(pos, self.zero_pos, self.zero_neg)
        mag = torch.exp2((self.q.float() + zero) * delta) - self.eta
        return mag * self.sign.float()


def _side_grid(logs: torch.Tensor, n_levels: int, pct: float, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # The reference's ``get_delta_zero_point_percentile``: the row's quantile and minimum
    # of a log tensor in which the other sign's entries are 0 (they take part, as there).
    # With ``mask`` only the side's own entries count (``own_sign_range``).
    if mask is None:
        hi, lo = _row_quantile(logs, pct), logs.amin(1, keepdim=True)
    else:
        own = torch.where(mask, logs, torch.full_like(logs, float("nan")))
        hi = torch.nanquantile(own.float(), q=pct, dim=1, keepdim=True, interpolation="nearest")
        lo = torch.where(mask, logs, torch.full_like(logs, float("inf"))).amin(1, keepdim=True)
        empty = ~mask.any(1, keepdim=True)  # a row without entries of this sign: any grid
        hi, lo = torch.where(empty, 0.0, hi), torch.where(empty, -1.0, lo)
    delta = ((hi - lo) / n_levels).clamp_min(1e-8)
    return delta, torch.round(lo / delta)


def _side_codes(logs: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
    return torch.clamp(torch.round(logs / delta) - zero, 0, top)


def twin_log_quantize(w: torch.Tensor, bits: int, own_sign_range: bool = False) -> TwinLogWeight:
    """Twin-log quantization of ``W [out, in]`` to ``b`` bits, as LRQ-DiT's public code does it.

    Restates ``StaticQuantizer.init_quant_params`` and ``forward`` (yanglianwei/LRQ-DiT,
    ``quant_utils/qdiff/base/base_quantizer.py``, asymmetric weights): for each ``eta`` in
    :data:`TWIN_LOG_ETAS` and each pair of upper quantiles ``(p+, p-)`` in
    :data:`CLIP_QUANTILES`, the positive and negative log-magnitude tensors
    ``log2(|w| + eta)`` (zero at the other sign's entries) each get a per-row grid of
    ``2^(b-1)`` steps from the row minimum to its quantile, codes
    ``clamp(round(l / delta) - zero, 0, top)`` with ``top = 2^(b-1) - 1`` for the positive
    side and ``2^(b-1)`` for the negative side (the reference's bounds), and the
    combination of least mean squared error over the tensor is kept.

    In the reference the other sign's zeros take part in each side's quantile, so for
    weights below 1 in magnitude the top of both grids sits at ``log2 = 0`` (magnitude
    ``1 - eta``) whatever the clip: the grid fits weights of order one (LRQ-DiT quantizes
    smoothed weights, whose scale the smoothing sets). ``own_sign_range=True`` is flowdit's
    variant, not the paper's: each side's quantile and minimum are taken over its own
    entries only, so the clip search acts on the weights' actual range.
    """
    w = w.float()
    n = 2 ** (bits - 1)
    pos_mask, neg_mask = w > 0, w < 0
    sign = pos_mask.to(torch.int8) - neg_mask.to(torch.int8)
    absw = w.abs()
    best, best_err = None, None
    for eta in TWIN_LOG_ETAS:
        logs = torch.log2(absw + eta) if eta > 0 else torch.log2(torch.where(sign != 0, absw, torch.ones_like(absw)))
        # The two sides cover disjoint entries, so the error of a pair is the sum of the
        # sides' errors and the reference's 5 x 5 search is two searches of 5; the first
        # minimum of each is the pair the nested loop keeps.
        sides = []
        for mask, top, sgn in ((pos_mask, n - 1, 1.0), (neg_mask, n, -1.0)):
            l_side = torch.where(mask, logs, torch.zeros_like(logs))
            side_best = None
            for p in CLIP_QUANTILES:
                d, z = _side_grid(l_side, n, p, mask if own_sign_range else None)
                q_side = _side_codes(l_side, d, z, top)
                err = torch.sum(((torch.exp2((q_side + z) * d) - eta) * sgn - w) ** 2 * mask)
                if side_best is None or err < side_best[0]:
                    side_best = (err, d, z, q_side)
            sides.append(side_best)
        err = (sides[0][0] + sides[1][0]) / w.numel()
        if best_err is None or err < best_err:
            best_err = err
            best = (eta, *sides[0][1:], *sides[1][1:])
    eta, d_pos, z_pos, q_pos, d_neg, z_neg, q_neg = best
    q = torch.where(pos_mask, q_pos, torch.where(neg_mask, q_neg, torch.zeros_like(q_pos)))
    return TwinLogWeight(q.to(torch.uint8), sign, d_pos.float(), z_pos.float(), d_neg.float(), z_neg.float(), float(eta), bits)


# --------------------------------------------------------------------------- activations


def fake_quant_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic symmetric per-token quantize-dequantize of ``x [..., C]`` (float in, float out).

    LRQ-DiT's ``DynamicQuantizer`` with ``sym: true``: ``delta = max|x_row| / n`` with
    ``n = 2^(b-1) - 1``, codes ``clamp(round(x / delta), -n - 1, n)``, value ``code * delta``.
    """
    n = 2 ** (bits - 1) - 1
    delta = x.abs().amax(-1, keepdim=True).clamp_min(1e-6) / n
    return torch.clamp(torch.round(x / delta), -n - 1, n) * delta


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 codes of ``x [M, C]``: ``(q [M, C] int8, delta [M, 1] float32)``
    with ``x ~ q * delta`` (the 8-bit case of :func:`fake_quant_tokens`, codes kept)."""
    delta = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-6) / 127
    return torch.clamp(torch.round(x / delta), -128, 127).to(torch.int8), delta
