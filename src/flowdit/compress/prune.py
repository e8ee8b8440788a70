"""Depth pruning end to end: choose the blocks to keep, copy them, recover.

:func:`select_blocks` runs one of the selection methods on a trained model and its data:

- ``tinyfusion``: the learned N:M gates with LoRA (:mod:`.tinyfusion`);
- ``importance``: ShortGPT's block influence, TinyFusion's baseline (:mod:`.block_importance`);
- ``oracle``: the subset with the lowest flow-matching loss before any recovery, found by
  trying every subset (:func:`flowdit.compress.depth.oracle_subsets`; 20 for 3 of 6);
- ``index``: blocks given by the user.

The kept blocks then go through :func:`flowdit.compress.depth.keep_blocks` and the shared
masked-KD recovery (:mod:`.recovery`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

from ..errors import ConfigError
from ..models import DiT
from .block_importance import block_similarity, importance_keep
from .depth import FlowStream, calibration_batches, check_kept, oracle_subsets
from .recovery import RecoveryConfig
from .tinyfusion import parse_groups, tinyfusion_search

__all__ = ["PRUNE_METHODS", "PruneConfig", "SELECTORS", "select_blocks"]



@dataclass
class PruneConfig:
    """What :func:`select_blocks` does. ``keep``: blocks to keep; ``kept``: the blocks for
    ``index``; ``groups``: TinyFusion's ``N:M`` (default one group ``keep:depth``);
    ``search_steps``: TinyFusion's gate training; ``importance_inputs``: ``clean``
    (reference) or ``noised``; ``score_samples``: images scoring the blocks (importance:
    the reference's 128) and the subsets (oracle); ``batch_size`` and ``seed`` of the
    training streams."""

    method: str = "tinyfusion"
    keep: Optional[int] = None
    kept: Optional[list[int]] = None
    groups: Optional[str] = None
    search_steps: int = 500
    lora_rank: int = 8
    lora_alpha: float = 16.0
    importance_inputs: Literal["clean", "noised"] = "clean"
    score_samples: int = 128
    oracle_samples: int = 1024
    batch_size: int = 128
    seed: int = 0
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def validate(self, depth: int) -> None:
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; valid: {', '.join(PRUNE_METHODS)}")
        if self.method == "index":
            if not self.kept:
                raise ConfigError("method index needs the kept blocks (--kept 0,2,4)")
            check_kept(self.kept, depth)
            if self.keep is not None and self.keep != len(self.kept):
                raise ConfigError(f"--keep {self.keep} disagrees with the {len(self.kept)} blocks of --kept")
        else:
            if self.keep is None or not 1 <= self.keep < depth:
                raise ConfigError(f"--keep must be in [1, {depth - 1}] for a {depth}-block model, got {self.keep}")
            if self.kept:
                raise ConfigError("--kept is for method index")
        if self.method == "tinyfusion":
            parse_groups(self.groups, depth, self.keep)
            if self.search_steps < 1 or self.lora_rank < 1:
                raise ConfigError("TinyFusion needs search steps >= 1 and a LoRA rank >= 1")
        if self.score_samples < 1 or self.oracle_samples < 1 or self.batch_size < 1:
            raise ConfigError("score/oracle samples and the batch size must be >= 1")
        self.recovery.validate()


def _select_index(model: DiT, dataset, meta: dict, cfg: PruneConfig, progress: bool) -> dict:
    return {"kept": check_kept(cfg.kept, len(model.blocks))}


def _select_importance(model: DiT, dataset, meta: dict, cfg: PruneConfig, progress: bool) -> dict:
    stream = FlowStream.of_run(dataset, meta, batch_size=16, seed=cfg.seed)
    stream.label_dropout = 0.0  # the reference scores with the real labels (model in eval mode)
    sims = block_similarity(model, calibration_batches(stream, -(-cfg.score_samples // 16)), cfg.importance_inputs)
    return {"kept": importance_keep(sims, cfg.keep), "similarity": sims}


def _select_oracle(model: DiT, dataset, meta: dict, cfg: PruneConfig, progress: bool) -> dict:
    stream = FlowStream.of_run(dataset, meta, batch_size=min(cfg.batch_size, cfg.oracle_samples), seed=cfg.seed)
    ranked = oracle_subsets(model, cfg.keep, calibration_batches(stream, -(-cfg.oracle_samples // stream.batch_size)))
    return {"kept": list(ranked[0][0]), "subsets": [[list(s), loss] for s, loss in ranked]}


def _select_tinyfusion(model: DiT, dataset, meta: dict, cfg: PruneConfig, progress: bool) -> dict:
    stream = FlowStream.of_run(dataset, meta, batch_size=cfg.batch_size, seed=cfg.seed)
    groups = parse_groups(cfg.groups, len(model.blocks), cfg.keep)
    res = tinyfusion_search(model, stream, groups, steps=cfg.search_steps, lora_rank=cfg.lora_rank,
                            lora_alpha=cfg.lora_alpha, seed=cfg.seed, progress=progress)
    return {"kept": res.kept, "groups": [list(g) for g in groups], "probabilities": res.probabilities,
            "trace": [[s, k, loss] for s, k, loss in res.trace]}


# name -> selector(model, dataset, meta, cfg, progress) -> {"kept": [...], evidence...};
# the CLI's --method choices and the benchmark read this table.
SELECTORS: dict[str, Callable[..., dict]] = {
    "tinyfusion": _select_tinyfusion,
    "importance": _select_importance,
    "oracle": _select_oracle,
    "index": _select_index,
}


def select_blocks(model: DiT, dataset, meta: dict, cfg: PruneConfig, progress: bool = True) -> dict:
    """The blocks to keep and how they were found: ``{"kept": [...], "seconds": s, ...}``
    with the method's evidence (TinyFusion's probabilities and trace, the block
    similarities, or every subset's loss)."""
    cfg.validate(len(model.blocks))
    t0 = time.perf_counter()
    out = SELECTORS[cfg.method](model, dataset, meta, cfg, progress)
    out["seconds"] = time.perf_counter() - t0
    return out


PRUNE_METHODS = tuple(SELECTORS)
