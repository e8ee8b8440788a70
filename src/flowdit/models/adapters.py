"""Diffscaler's Affiner: a task-specific transformation around a frozen linear layer.

Nair, Valanarasu and Patel, "Diffscaler: Enhancing the Generative Prowess of Diffusion
Transformers" (2024), adapt one pre-trained diffusion transformer to a new data set by
training, in every layer, a transformation that re-weights the subspace the layer already
spans and adds a small non-linear one it lacks:

    y = (1 + a) * (W x) + b + b' + s * W_up ReLU(W_down x)

``W [out, in]`` and ``b [out]`` are the frozen pre-trained weights; the trained parameters
are the per-output scale ``a`` and shift ``b'`` (both ``[out]``, zero at the start), the
down projection ``W_down [r, in]`` (nn.Linear's initialisation), the up projection
``W_up [out, r]`` (zero at the start) and the per-output gate ``s [out]`` (one at the
start), so an adapted model starts exactly where the pre-trained one is. The authors'
code is not public; the zero / one starts and the per-channel ``s`` are flowdit's reading
of the paper's description.

The layer lives with the models (not with the training method in
:mod:`flowdit.compress.adapt`) because an adapted run is stored with its Affiners and
loading it must rebuild them: :func:`apply_adapters` from the manifest's ``adapter``
entry.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Affiner", "add_affiners", "adapter_targets", "apply_adapters"]


class Affiner(nn.Module):
    """A frozen ``nn.Linear`` (``.base``) inside Diffscaler's trained transformation.

    ``x [..., in] -> [..., out]``; see the module docstring for the formula and the
    starting values. ``rank`` is the width ``r`` of the new non-linear subspace.
    """

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"Affiner rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        dev = base.weight.device
        out_f, in_f = base.out_features, base.in_features
        self.scale = nn.Parameter(torch.zeros(out_f, device=dev))
        self.shift = nn.Parameter(torch.zeros(out_f, device=dev))
        self.down = nn.Parameter(torch.empty(rank, in_f, device=dev))
        self.up = nn.Parameter(torch.zeros(out_f, rank, device=dev))
        self.gate = nn.Parameter(torch.ones(out_f, device=dev))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

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
        wx = x @ self.base.weight.t().to(x.dtype)
        y = (1 + self.scale.to(x.dtype)) * wx + self.shift.to(x.dtype)
        if self.base.bias is not None:
            y = y + self.base.bias.to(x.dtype)
        side = torch.relu(x @ self.down.t().to(x.dtype)) @ self.up.t().to(x.dtype)
        return y + self.gate.to(x.dtype) * side

    def trained_parameters(self) -> list[nn.Parameter]:
        return [self.scale, self.shift, self.down, self.up, self.gate]


def adapter_targets(model: nn.Module, skip: Iterable[str] = ()) -> list[str]:
    """Qualified names of the ``nn.Linear`` layers of ``model`` not under a prefix in ``skip``."""
    skip = tuple(skip)
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not (skip and name.startswith(skip))]


def add_affiners(model: nn.Module, rank: int, layers: Sequence[str]) -> nn.Module:
    """Wrap, in place, each ``nn.Linear`` named in ``layers`` in an :class:`Affiner`; returns ``model``."""
    for name in layers:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"adapter layer {name!r} is a {type(mod).__name__}, not a linear layer")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Affiner(mod, rank))
    return model


def apply_adapters(model: nn.Module, spec: dict) -> nn.Module:
    """Rebuild the adapters a stored run was adapted with, from its manifest entry
    ``spec = {"method": "affiner", "rank": r, "layers": [names]}``; its weights are then
    loaded as usual. Methods whose update merges into the weights (LoRA, full fine-tuning)
    store plain models and need nothing here."""
    method = spec.get("method")
    if method != "affiner":
        raise ValueError(f"unknown stored adapter method {method!r}")
    return add_affiners(model, int(spec["rank"]), list(spec["layers"]))
