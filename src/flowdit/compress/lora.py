"""Low-rank adapters on frozen linears (Hu et al., "LoRA", ICLR 2022, eq. 3).

``y = W x + b + (alpha / r) B A x`` with ``A [r, in]`` Kaiming-uniform and ``B [out, r]``
zero, so an adapted model starts exactly where the frozen one is. TinyFusion co-optimises
such adapters with its block gates (its ``convert_to_lora_model`` wraps every linear of the
DiT in torchtune's ``LoRALinear``, rank 8, alpha 16); the adaptation methods of
:mod:`flowdit.compress` reuse them.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "add_lora", "lora_parameters", "merge_lora"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``rank`` update scaled by ``alpha / rank``.

    ``x [..., in] -> [..., out]``. The wrapped layer stays reachable as ``.base`` and is not
    trained (its parameters have ``requires_grad=False``).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        # torchtune's (and nn.Linear's) initialisation of A; B = 0 makes the update start at 0.
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self) -> Tensor:
        """The frozen weight (modules that read ``.weight``, e.g. for its dtype, keep working)."""
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scaling

    def delta_weight(self) -> Tensor:
        """The update ``(alpha / r) B A [out, in]`` the adapter adds to ``W``."""
        return self.scaling * self.lora_b @ self.lora_a


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, skip: Iterable[str] = ()) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose qualified name does not start
    with one of ``skip`` by a :class:`LoRALinear` around it; returns ``model``."""
    skip = tuple(skip)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not (skip and name.startswith(skip))]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(mod, rank, alpha))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (``A`` and ``B`` of every :class:`LoRALinear`), in module order."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


@torch.no_grad()
def merge_lora(model: nn.Module, keep_update: bool = True) -> nn.Module:
    """Put every :class:`LoRALinear` back as a plain ``nn.Linear``, in place: with
    ``keep_update`` its weight becomes ``W + (alpha / r) B A``, else the adapter is dropped
    (TinyFusion discards its search-time adapters and keeps the original weights)."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]
    for name, mod in targets:
        base = mod.base
        if keep_update:
            base.weight.add_(mod.delta_weight().to(base.weight.dtype))
        for p in base.parameters():
            p.requires_grad_(True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
    return model
