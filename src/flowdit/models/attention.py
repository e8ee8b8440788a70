"""Self-attention with swappable processors.

The ``Attention`` module owns the weights (``qkv``, ``proj``, optional QK-norm gains);
how queries, keys and values are combined is delegated to a *processor*, a callable
``processor(attn, x, ctx) -> out``. Methods that need to read or change the attention
math (feature sharing for editing, sparse or grouped attention, caching keys/values)
install their own processor on chosen layers instead of editing the model, in the
spirit of diffusers' attention processors.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from flowdit.core.hooks import StepContext, attention_hooks

from .layers import RMSNorm


class AttentionProcessor(Protocol):
    """Computes self-attention for ``attn`` on tokens ``x [B, N, D] -> [B, N, D]``."""

    def __call__(self, attn: "Attention", x: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor: ...


def qkv_heads(attn: "Attention", x: torch.Tensor, ctx: Optional[StepContext] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project tokens to per-head queries, keys and values, ``3 x [B, H, N, Dh]``.

    One fused matmul for q, k and v; QK-norm (when enabled) is applied per head. With a
    step context the result passes through its ``attention`` hooks (RF-Edit's value
    sharing), so every processor that projects through here composes with them.
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).view(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if ctx is not None and ctx.hooks.attention:
        return attention_hooks(attn, q, k, v, ctx)
    return q, k, v


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, Dh] -> [B, N, H * Dh]``."""
    B, H, N, Dh = o.shape
    return o.transpose(1, 2).reshape(B, N, H * Dh)


def cpu_bf16_training(q: torch.Tensor) -> bool:
    """True for bf16 attention inputs on a CPU that will be differentiated.

    PyTorch's CPU flash-attention *backward* in bf16 is several times slower than in fp32
    (DiT-mnist, 49 tokens, head dim 32: 115 vs 16 ms for forward + backward of one layer on
    a 2-core AMX Xeon; the whole bf16 training step was slower than fp32 because of it), while its forward
    is as fast in either precision. So a CPU training step runs attention in fp32 and
    everything else in bf16; `benchmarks/attention_cpu.py` measures the choice.
    """
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(Dh)) v`` for ``[B, H, N, Dh]`` heads through PyTorch's SDPA, in
    fp32 for a differentiated bf16 call on a CPU (:func:`cpu_bf16_training`), else as given."""
    if not cpu_bf16_training(q):
        return F.scaled_dot_product_attention(q, k, v)
    # Autocast would cast fp32 inputs straight back to bf16 for this op.
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


class SDPAProcessor:
    """Default processor: ``torch.nn.functional.scaled_dot_product_attention``, which picks
    the flash / memory-efficient / math kernel for the device and dtype. On a CPU under
    bf16 autocast, a differentiated call runs in fp32 (see :func:`cpu_bf16_training`)."""

    def __call__(self, attn: "Attention", x: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        return attn.proj(merge_heads(sdpa(*qkv_heads(attn, x, ctx))))


class MathProcessor:
    """Reference processor: explicit ``softmax(q k^T / sqrt(d)) v`` in float32 (for tests and
    for methods that must see the attention map)."""

    def __call__(self, attn: "Attention", x: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        q, k, v = qkv_heads(attn, x, ctx)
        scores = (q.float() @ k.float().transpose(-2, -1)) * attn.head_dim**-0.5
        o = (scores.softmax(dim=-1) @ v.float()).to(v.dtype)
        return attn.proj(merge_heads(o))


class Attention(nn.Module):
    """Multi-head self-attention, parameters named as in timm / DiT (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim)
            self.k_norm = RMSNorm(self.head_dim)
        self.processor: AttentionProcessor = SDPAProcessor()

    def forward(self, x: torch.Tensor, ctx: Optional[StepContext] = None) -> torch.Tensor:
        return self.processor(self, x, ctx)
