"""Quantized replacements for ``nn.Linear``: exact fake quantization and real int8.

Both take the place of a trained ``nn.Linear`` in a model (same input and output), so
every sampler, cache and editing method runs on a quantized model unchanged.

- :class:`FakeQuantLinear` computes exactly what a low-bit kernel would (weights
  dequantized from their codes once, activations quantized and dequantized per token
  on the fly), in float: the quality of W4A8, W3A6, W3A4 measured without a kernel.
- :class:`Int8Linear` is W8A8 that really multiplies in int8 on a CPU: per-channel int8
  weights, per-token dynamic int8 activations, int32 accumulation, through oneDNN's
  prepacked int8 GEMM on x86 CPUs with VNNI or AMX (where it is exact) and
  ``torch._int_mm`` elsewhere.

An optional per-input-channel ``smooth`` factor (SmoothQuant's migration) multiplies the
input and divides the weight's columns; an optional rotation ``R`` (a randomised
Hadamard, or LRQ-DiT's outlier-aware rotation) rotates both, ``x W^T = (x s R)((W / s) R)^T``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import fake_quant_tokens, quantize_tokens_int8

__all__ = ["FakeQuantLinear", "Int8Linear", "exact_onednn_int8", "int8_backend"]

_ZERO = torch.zeros((), dtype=torch.long)
_COMPILED: dict = {}


def _quantize_rows(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_tokens_int8(x * smooth)


def _quantize_tensor(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xs = x * smooth
    delta = xs.abs().amax().clamp_min(1e-6) / 127
    return torch.clamp(torch.round(xs / delta), -128, 127).to(torch.int8), delta


def _fused(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class FakeQuantLinear(nn.Module):
    """``y = Q_a((x * s) R) W_q^T + b`` with ``W_q [out, in]`` the dequantized codes of the
    transformed weight ``(W / s) R`` and ``Q_a`` per-token fake quantization to
    ``act_bits`` (``None``: weight-only).

    Args:
        weight: ``[out, in]`` dequantized weight, already divided by ``smooth`` and rotated.
        bias: ``[out]`` or ``None`` (kept in float, as in the reference methods).
        smooth: ``[in]`` input multiplier or ``None``.
        rotation: ``[in, in]`` orthogonal input rotation ``R`` or ``None``.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], act_bits: Optional[int],
                 smooth: Optional[torch.Tensor] = None, rotation: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.act_bits = act_bits
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.register_buffer("smooth", None if smooth is None else smooth.float().contiguous())
        self.register_buffer("rotation", None if rotation is None else rotation.float().contiguous())

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``(x * s) R``: the activation the quantizer sees."""
        if self.smooth is not None:
            x = x * self.smooth.to(x.dtype)
        if self.rotation is not None:
            x = x @ self.rotation.to(x.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 even under autocast: the layer stands for an integer kernel, whose
        # result bf16 rounding would blur.
        dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x = self.transform_input(x.float())
            if self.act_bits is not None:
                x = fake_quant_tokens(x, self.act_bits)
            return F.linear(x, self.weight, self.bias).to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, act_bits={self.act_bits}, "
                f"smooth={self.smooth is not None}, rotation={self.rotation is not None}")


def exact_onednn_int8() -> bool:
    """Whether oneDNN's int8 linear is exact on this CPU.

    oneDNN's s8 x s8 GEMM is exact (int32 accumulation) on CPUs with VNNI or AMX int8
    instructions. Without them (AVX2-only x86) it multiplies through ``vpmaddubsw``, which
    adds pairs of products in int16 with saturation: products of full-range int8 codes
    overflow and the result is silently wrong, so flowdit does not use it there.
    """
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not hasattr(ops, "qlinear_prepack") or not torch.backends.mkldnn.is_available():
        return False
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_vnni_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def int8_backend() -> str:
    """``"onednn"`` where its int8 linear is exact on this CPU (:func:`exact_onednn_int8`:
    x86 with VNNI or AMX), else ``"int_mm"`` (``torch._int_mm``, exact everywhere)."""
    return "onednn" if exact_onednn_int8() else "int_mm"


class Int8Linear(nn.Module):
    """W8A8 linear that multiplies in int8: ``y = (q_x q_w^T) * d_x * d_w + b``.

    ``q_w [out, in]`` int8 with per-row scale ``d_w`` (symmetric, ``d_w = max|w_row| / 127``,
    of the weight divided by ``smooth``); ``q_x, d_x`` are the int8 codes of ``x * smooth``,
    per token (``act="token"``, :func:`quantize_tokens_int8`: SmoothQuant's O1 setting) or
    with one scale for the whole input (``act="tensor"``: its dynamic per-tensor O2 setting,
    where oneDNN applies every scale and the bias inside the GEMM, the fast path). The
    integer product is exact (int32 accumulation), so the output equals the float product
    of the dequantized operands up to the rounding of the final scaling. Inputs of any
    leading shape ``[..., in]``.

    ``fused=True`` runs the quantization of the input (multiply by ``smooth``, max, round,
    cast: several passes over the activation in eager mode) as one ``torch.compile``d
    kernel; it needs a working C++ compiler and gives the same codes up to float rounding.

    ``backend``: ``"onednn"`` (weights prepacked once, on first use, for oneDNN's s8 x s8
    GEMM with the per-row scale applied in its epilogue), ``"int_mm"`` (``torch._int_mm``)
    or ``"auto"`` (:func:`int8_backend`).
    """

    def __init__(self, qweight: torch.Tensor, wscale: torch.Tensor, bias: Optional[torch.Tensor],
                 smooth: Optional[torch.Tensor] = None, backend: str = "auto", act: str = "token",
                 fused: bool = False):
        super().__init__()
        if act not in ("token", "tensor"):
            raise ValueError(f"act must be token or tensor, got {act!r}")
        self.act = act
        self.fused = fused
        if qweight.dtype != torch.int8:
            raise ValueError(f"qweight must be int8, got {qweight.dtype}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("wscale", wscale.float().reshape(-1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.register_buffer("smooth", None if smooth is None else smooth.float().contiguous())
        self.backend = int8_backend() if backend == "auto" else backend
        if self.backend not in ("onednn", "int_mm"):
            raise ValueError(f"backend must be auto, onednn or int_mm, got {backend!r}")
        if self.backend == "onednn" and not exact_onednn_int8():
            raise ValueError("backend onednn: this CPU has no VNNI / AMX int8 instructions, where oneDNN's "
                             "int8 GEMM saturates; use backend int_mm (or auto)")
        self._packed = None
        self._zeros = None
        self._qweight_t = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: Optional[torch.Tensor] = None, backend: str = "auto",
                    act: str = "token") -> "Int8Linear":
        """Quantize a float ``nn.Linear`` (weights divided by ``smooth`` first)."""
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w / smooth.float()[None, :]
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
        b = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, b, smooth, backend, act)

    def dequantized_weight(self) -> torch.Tensor:
        """``q_w * d_w``, ``[out, in]`` float32."""
        return self.qweight.float() * self.wscale[:, None]

    def _onednn_packed(self, rows: int):
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.qweight, [rows, self.in_features])
            self._zeros = torch.zeros(self.out_features, dtype=torch.long)
        return self._packed

    def int_matmul(self, qx: torch.Tensor) -> torch.Tensor:
        """``q_x [M, in] int8 -> (q_x q_w^T) * d_w`` float32 ``[M, out]``, on the chosen backend."""
        if self.backend == "onednn":
            return torch.ops.onednn.qlinear_pointwise(
                qx, 1.0, 0, self._onednn_packed(qx.shape[0]), self.wscale, self._zeros, None, 1.0, 0,
                torch.float32, "none", [], "")
        if self._qweight_t is None:
            self._qweight_t = self.qweight.t().contiguous()
        return torch._int_mm(qx, self._qweight_t).float() * self.wscale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        smooth = self.smooth if self.smooth is not None else torch.ones(self.in_features)
        if self.act == "token":
            qx, dx = (_fused(_quantize_rows) if self.fused else _quantize_rows)(x2, smooth)
            y = self.int_matmul(qx) * dx
            if self.bias is not None:
                y = y + self.bias
        else:
            qx, dx = (_fused(_quantize_tensor) if self.fused else _quantize_tensor)(x2, smooth)
            if self.backend == "onednn":  # scales and bias in the GEMM's epilogue
                y = torch.ops.onednn.qlinear_pointwise.tensor(
                    qx, dx, _ZERO, self._onednn_packed(qx.shape[0]), self.wscale, self._zeros, self.bias, 1.0, 0,
                    torch.float32, "none", [], "")
            else:
                y = self.int_matmul(qx) * dx
                if self.bias is not None:
                    y = y + self.bias
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        # Moving or casting the module invalidates the prepacked weight.
        self._packed = self._qweight_t = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, backend={self.backend}, smooth={self.smooth is not None}"
