"""Adapting a trained DiT to a new data set with few trained parameters (Diffscaler).

Three methods share one loop, one objective (the run's own rectified-flow loss
``||v(x_t, t, y) - (eps - x0)||^2`` on the new data) and one budget, so their trained
parameter counts and results compare directly:

- ``affiner``: Diffscaler's Affiner (:class:`flowdit.models.adapters.Affiner`) around
  every adapted linear layer, everything else frozen;
- ``lora``: LoRA (:class:`flowdit.compress.lora.LoRALinear`) on the same layers, merged
  into the weights when the run is stored;
- ``full``: full fine-tuning of every parameter.

AdamW without weight decay, linear warm-up then constant rate, gradient clipping at 1, an
EMA of the weights (the model sampled from). The loop hands its state to a ``save``
callback every ``ckpt_every`` steps and continues bit-exactly from such a state.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..models.adapters import Affiner, add_affiners, adapter_targets
from .depth import FlowStream
from .lora import LoRALinear, add_lora, merge_lora

__all__ = ["ADAPTERS", "ADAPT_METHODS", "AdaptConfig", "adapt", "adapt_setting", "count_trained", "prepare_adapters", "stored_model"]

@dataclass
class AdaptConfig:
    """Adaptation settings. ``rank``: the Affiner's ``r`` or LoRA's rank (LoRA's ``alpha``
    is ``2 * rank`` unless given); ``skip``: name prefixes of linears left frozen and
    unadapted (the timestep embedder by default: the time axis does not change with the
    data set)."""

    method: str = "affiner"
    rank: int = 8
    lora_alpha: Optional[float] = None
    skip: tuple = ("t_embedder",)
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.999
    clip: float = 1.0
    ckpt_every: int = 250

    def validate(self) -> None:
        if self.method not in ADAPT_METHODS:
            raise ConfigError(f"adapt method must be one of {', '.join(ADAPT_METHODS)}, got {self.method!r}")
        if self.rank < 1:
            raise ConfigError(f"adapt rank must be >= 1, got {self.rank}")
        if self.steps < 1 or self.warmup_steps < 0 or self.ckpt_every < 1:
            raise ConfigError("adapt: steps >= 1, warmup_steps >= 0 and ckpt_every >= 1")
        if self.lr <= 0 or not 0 <= self.ema_decay < 1 or self.clip <= 0:
            raise ConfigError("adapt: lr > 0, ema_decay in [0, 1), clip > 0")


def _full(model: nn.Module, cfg: "AdaptConfig", layers: list[str]) -> list[nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(True)
    return list(model.parameters())


def _affiner(model: nn.Module, cfg: "AdaptConfig", layers: list[str]) -> list[nn.Parameter]:
    add_affiners(model, cfg.rank, layers)
    return [p for m in model.modules() if isinstance(m, Affiner) for p in m.trained_parameters()]


def _lora(model: nn.Module, cfg: "AdaptConfig", layers: list[str]) -> list[nn.Parameter]:
    add_lora(model, cfg.rank, 2.0 * cfg.rank if cfg.lora_alpha is None else cfg.lora_alpha, skip=cfg.skip)
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def _keep(model: nn.Module, cfg: "AdaptConfig", layers: list[str]) -> tuple[nn.Module, Optional[dict]]:
    return model, None


def _keep_affiners(model: nn.Module, cfg: "AdaptConfig", layers: list[str]) -> tuple[nn.Module, Optional[dict]]:
    return model, {"method": "affiner", "rank": cfg.rank, "layers": list(layers)}


def _merge_lora(model: nn.Module, cfg: "AdaptConfig", layers: list[str]) -> tuple[nn.Module, Optional[dict]]:
    return merge_lora(copy.deepcopy(model)), None


# method -> (put its trainable parameters into the frozen model and return them,
#            the form it is stored in with its manifest ``adapter`` entry).
# ``adapts_layers``: whether the method wraps the linears (the others train weights in place).
ADAPTERS: dict[str, tuple[Callable, Callable, bool]] = {
    "affiner": (_affiner, _keep_affiners, True),
    "lora": (_lora, _merge_lora, True),
    "full": (_full, _keep, False),
}
ADAPT_METHODS = tuple(ADAPTERS)


def prepare_adapters(model: nn.Module, cfg: AdaptConfig) -> tuple[nn.Module, list[nn.Parameter], list[str]]:
    """Put ``cfg.method``'s trainable parameters into ``model`` (in place), everything
    else frozen.

    Returns ``(model, the parameters to train, the adapted layer names)``; for ``full``
    the names are empty and every parameter trains."""
    cfg.validate()
    prepare, _, wraps = ADAPTERS[cfg.method]
    layers = adapter_targets(model, cfg.skip) if wraps else []
    for p in model.parameters():
        p.requires_grad_(False)
    return model, prepare(model, cfg, layers), layers


def adapt_setting(cfg: AdaptConfig, stream: FlowStream) -> dict:
    """What a resumed adaptation must share with the one that wrote its checkpoint (JSON)."""
    return {"adapt": {**asdict(cfg), "skip": list(cfg.skip)}, "batch_size": stream.batch_size, "seed": stream.seed}


def stored_model(model: nn.Module, cfg: AdaptConfig, layers: list[str]) -> tuple[nn.Module, Optional[dict]]:
    """The form an adapted model is saved in, and its manifest ``adapter`` entry: LoRA
    merged into plain linears (``None``: nothing to rebuild), Affiners kept with
    ``{"method": "affiner", "rank", "layers"}``, a fully fine-tuned model as it is."""
    return ADAPTERS[cfg.method][1](model, cfg, layers)


def adapt(model: nn.Module, stream: FlowStream, cfg: AdaptConfig,
          save: Optional[Callable[[int, dict, dict], None]] = None,
          resume: Optional[tuple[dict, dict]] = None,
          progress: bool = True) -> tuple[nn.Module, nn.Module, list[dict], list[str]]:
    """Adapt ``model`` (a trained DiT, modified in place) to the data of ``stream`` for
    ``cfg.steps`` steps of the flow-matching loss, training only ``cfg.method``'s parameters.

    Returns ``(model, its EMA, log, adapted layer names)``, ``log`` holding
    ``{"step", "loss"}`` means every 50 steps. ``save(step, tensors, trainer_state)`` is
    called every ``cfg.ckpt_every`` steps and at the end with ``tensors = {"model", "ema"}``
    state dicts of the adapter-carrying model; passing such a pair back as ``resume``
    continues exactly where it was written (batch ``i`` depends only on ``i``)."""
    from tqdm import tqdm

    model, params, layers = prepare_adapters(model.float(), cfg)
    model.train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    trained = {id(p) for p in params}
    pairs = [(pe, p) for pe, p in zip(ema.parameters(), model.parameters()) if id(p) in trained]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    start, log, running, n_run = 0, [], 0.0, 0
    if resume is not None:
        tensors, state = resume
        model.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, log = int(state["step"]), [dict(r) for r in state["log"]]
        running, n_run = float(state["running"]), int(state["n_run"])

    def checkpoint(step: int) -> None:
        if save is not None:
            save(step, {"model": model.state_dict(), "ema": ema.state_dict()},
                 {"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, "log": log,
                  "running": running, "n_run": n_run})

    bar = tqdm(range(start, cfg.steps), desc=f"adapt ({cfg.method})", disable=not progress, leave=False,
               initial=start, total=cfg.steps)
    for step in bar:
        b = stream.batch(step)
        loss = ((model(b.xt, b.t, b.y).float() - b.target) ** 2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"adapt step {step}: non-finite loss; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in pairs:
                pe.mul_(cfg.ema_decay).add_(p.detach(), alpha=1 - cfg.ema_decay)
        running += loss.item()
        n_run += 1
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log.append({"step": step + 1, "loss": running / n_run})
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            running, n_run = 0.0, 0
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
    if start < cfg.steps or resume is None:
        checkpoint(cfg.steps)
    return model.eval(), ema, log, layers


def count_trained(params: list[nn.Parameter]) -> int:
    """Number of scalars in ``params``."""
    return sum(p.numel() for p in params)
