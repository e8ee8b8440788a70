"""Depth pruning of a DiT: what every layer-removal method shares.

A depth-pruned model is an ordinary :class:`~flowdit.models.DiT` with fewer blocks
(``depth = len(kept)``), the kept blocks copied in their order, so every sampler, cache
and benchmark runs it unchanged. Which blocks to keep is each method's business
(:mod:`.block_importance`, :mod:`.tinyfusion`, and :func:`oracle_subsets` here); how the
pruned model recovers is :mod:`.recovery`.

Also here: the training stream of the rectified-flow objective on a run's data (the loss
the search and the recovery optimise) and the fixed calibration states the oracle and the
block scores are measured on.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..core.path import interpolate, velocity_target
from ..core.timesteps import build_time_sampler
from ..data.base import ImageDataset, to_float
from ..errors import ConfigError
from ..models import DiT, DiTConfig
from ..utils.seeding import seeded_generator

__all__ = ["FlowBatch", "FlowStream", "calibration_batches", "check_kept", "keep_blocks", "oracle_subsets",
           "subset_loss"]


@dataclass
class FlowBatch:
    """One batch of the rectified-flow objective: data ``x0``, noise ``eps``, the state
    ``xt = (1 - t) x0 + t eps`` (all ``[B, C, H, W]``), times ``t [B]`` and labels ``y [B]``
    (dropped ones replaced by the model's null class)."""

    x0: Tensor
    eps: Tensor
    xt: Tensor
    t: Tensor
    y: Tensor

    @property
    def target(self) -> Tensor:
        """The regression target ``eps - x0``."""
        return velocity_target(self.x0, self.eps)


class FlowStream:
    """Batches of the objective a run was trained with: images drawn uniformly from
    ``dataset``, times from the run's ``flow.time_sampler``, labels dropped with
    probability ``label_dropout`` (classifier-free guidance training). Batch ``i`` depends
    only on ``(seed, i)``, so a resumed loop sees exactly the batches it would have seen."""

    def __init__(self, dataset: ImageDataset, batch_size: int, time_sampler: str, label_dropout: float,
                 null_class: Optional[int], seed: int = 0):
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.times = build_time_sampler(time_sampler)
        self.label_dropout, self.null_class = label_dropout, null_class

    @classmethod
    def of_run(cls, dataset: ImageDataset, meta: dict, batch_size: int, seed: int = 0) -> "FlowStream":
        """The stream of the run whose manifest ``meta`` is given (its time sampler and label dropout)."""
        flow = meta["config"]["flow"]
        null = meta["model_config"]["num_classes"]
        return cls(dataset, batch_size, flow["time_sampler"], float(flow.get("label_dropout", 0.0)), null, seed)

    def batch(self, i: int, device: torch.device | str = "cpu") -> FlowBatch:
        g = seeded_generator(self.seed, i)
        n = len(self.dataset.labels)
        idx = torch.randint(0, n, (self.batch_size,), generator=g)
        x0 = to_float(self.dataset.images[idx])
        eps = torch.randn(x0.shape, generator=g)
        t = self.times.sample(self.batch_size, generator=g)
        y = self.dataset.labels[idx].clone()
        if self.null_class is not None and self.label_dropout > 0:
            y = torch.where(torch.rand(self.batch_size, generator=g) < self.label_dropout,
                            torch.full_like(y, self.null_class), y)
        x0, eps, t, y = (v.to(device) for v in (x0, eps, t, y))
        return FlowBatch(x0, eps, interpolate(x0, eps, t), t, y)

    def __iter__(self) -> Iterator[FlowBatch]:
        return (self.batch(i) for i in itertools.count())


def calibration_batches(stream: FlowStream, num: int) -> list[FlowBatch]:
    """``num`` fixed batches (indices far from any training stream's), for scoring."""
    return [stream.batch(10**9 + i) for i in range(num)]


def check_kept(kept: Sequence[int], depth: int) -> list[int]:
    """``kept`` as a sorted list of distinct block indices of a ``depth``-block model."""
    kept = sorted(int(k) for k in kept)
    if not kept:
        raise ConfigError("keep at least one block")
    if len(set(kept)) != len(kept) or kept[0] < 0 or kept[-1] >= depth:
        raise ConfigError(f"kept blocks {kept} must be distinct indices in [0, {depth})")
    return kept


def keep_blocks(model: DiT, kept: Sequence[int]) -> DiT:
    """A new DiT with ``depth = len(kept)`` whose blocks are copies of ``model.blocks[kept]``
    (in order) and whose embedders and output layer are copies of ``model``'s."""
    kept = check_kept(kept, len(model.blocks))
    cfg = DiTConfig(**{**model.config_dict(), "depth": len(kept)})
    out = DiT(cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for new, old in enumerate(kept):
        prefix = f"blocks.{old}."
        sd.update({f"blocks.{new}.{k[len(prefix):]}": v for k, v in model.state_dict().items()
                   if k.startswith(prefix)})
    out.load_state_dict(copy.deepcopy(sd), strict=True)
    return out.train(model.training)


@torch.no_grad()
def subset_loss(model: DiT, kept: Sequence[int], batches: Sequence[FlowBatch]) -> float:
    """The flow-matching loss ``E ||v(x_t, t, y) - (eps - x0)||^2`` (per-element mean) of the
    model that runs only the blocks ``kept``, on fixed ``batches``; no weights change."""
    kept = check_kept(kept, len(model.blocks))
    total, count = 0.0, 0
    for b in batches:
        tokens, c = model.embed(b.xt, b.t, b.y)
        for i in kept:
            tokens = model.blocks[i](tokens, c)
        v = model.unpatchify(model.final_layer(tokens, c))
        total += float(((v.float() - b.target) ** 2).sum())
        count += v.numel()
    return total / count


def oracle_subsets(model: DiT, keep: int, batches: Sequence[FlowBatch]) -> list[tuple[tuple[int, ...], float]]:
    """Every ``keep``-block subset of the model with its :func:`subset_loss` (no recovery),
    best first: ``C(depth, keep)`` entries, e.g. 20 for 3 of 6 blocks."""
    depth = len(model.blocks)
    if not 1 <= keep <= depth:
        raise ConfigError(f"keep must be in [1, {depth}], got {keep}")
    scored = [(s, subset_loss(model, s, batches)) for s in itertools.combinations(range(depth), keep)]
    return sorted(scored, key=lambda r: r[1])
