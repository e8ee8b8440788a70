"""Recovery of a depth-pruned DiT by TinyFusion's masked knowledge distillation.

The pruned model (the student, initialised from the kept blocks) is trained against the
unpruned one (the teacher) with :func:`flowdit.compress.tinyfusion.masked_kd_loss` on the
run's own training objective; every pruning method is recovered by this same loop at the
same budget, so their comparison is fair. As in TinyFusion's ``train_masked_kd.py``: AdamW
at 2e-4 without weight decay, cosine decay to half the rate, gradient clipping at 1, the
teacher seeing the student's dropped labels, the feature weight ``beta_feat`` decaying
linearly to 0 (per epoch there, per step here), and an EMA of the weights (0.9999 over the
reference's 100 ImageNet epochs; 0.999 by default for the ~1,000 steps here).

Student block ``k`` (teacher block ``kept[k]``) is matched to the teacher's output of the
last block it replaces, ``kept[k + 1] - 1`` (the last block for the last student block):
the reference's fixed pairing for uniform 1:2 pruning (student ``i`` to teacher ``2i+1``)
is this rule's special case.

The loop hands its state to a ``save`` callback every ``ckpt_every`` steps (the CLI writes
atomic, finite checkpoints with it) and continues bit-exactly from such a state.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError
from ..models import DiT
from .depth import FlowStream, check_kept
from .tinyfusion import masked_kd_loss

__all__ = ["RecoveryConfig", "feature_targets", "recover", "recovery_setting"]


@dataclass
class RecoveryConfig:
    """Masked-KD recovery settings (reference values; ``ema_decay`` scaled to the budget)."""

    steps: int = 1000
    lr: float = 2e-4
    final_lr_ratio: float = 0.5
    alpha_kd: float = 0.9
    beta_feat: float = 1e-2
    ema_decay: float = 0.999
    clip: float = 1.0
    ckpt_every: int = 250

    def validate(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"recovery steps must be >= 0, got {self.steps}")
        if self.lr <= 0 or not 0 < self.final_lr_ratio <= 1:
            raise ConfigError(f"recovery lr must be > 0 and final_lr_ratio in (0, 1], got {self.lr}, "
                              f"{self.final_lr_ratio}")
        if not 0 <= self.alpha_kd <= 1 or self.beta_feat < 0 or not 0 <= self.ema_decay < 1:
            raise ConfigError("recovery: alpha_kd in [0, 1], beta_feat >= 0, ema_decay in [0, 1)")
        if self.ckpt_every < 1:
            raise ConfigError(f"recovery ckpt_every must be >= 1, got {self.ckpt_every}")


def feature_targets(kept: Sequence[int], depth: int) -> list[int]:
    """The teacher block whose output student block ``k`` is matched to: ``kept[k+1] - 1``,
    and ``depth - 1`` for the last (module docstring)."""
    kept = check_kept(kept, depth)
    return [kept[k + 1] - 1 for k in range(len(kept) - 1)] + [depth - 1]


def _run(model: DiT, xt, t, y, keep_outputs: Optional[set[int]] = None):
    tokens, c = model.embed(xt, t, y)
    feats = {}
    for i, block in enumerate(model.blocks):
        tokens = block(tokens, c)
        if keep_outputs is None or i in keep_outputs:
            feats[i] = tokens
    return model.unpatchify(model.final_layer(tokens, c)).to(xt.dtype), feats


def recovery_setting(kept: Sequence[int], cfg: RecoveryConfig, stream: FlowStream) -> dict:
    """What a resumed recovery must share with the one that wrote its checkpoint (JSON)."""
    return {"kept": list(kept), "recovery": asdict(cfg), "batch_size": stream.batch_size, "seed": stream.seed}


def recover(student: DiT, teacher: DiT, kept: Sequence[int], stream: FlowStream, cfg: RecoveryConfig,
            save: Optional[Callable[[int, dict, dict], None]] = None,
            resume: Optional[tuple[dict, dict]] = None,
            progress: bool = True) -> tuple[DiT, DiT, list[dict]]:
    """Train ``student`` (``len(kept)`` blocks, initialised from ``teacher.blocks[kept]``)
    against ``teacher`` for ``cfg.steps`` steps of the masked KD.

    Returns ``(student, its EMA, log)`` with ``log`` a list of ``{"step", "loss", "kd",
    "gt", "feat"}`` means every 50 steps. ``save(step, tensors, trainer_state)`` is called
    every ``cfg.ckpt_every`` steps and at the end, with ``tensors = {"model", "ema"}``
    state dicts and ``trainer_state = {"opt", "sched", "step", "log", ...}``; passing such a
    pair back as ``resume`` continues exactly where it was written (the batches depend only
    on the step). The caller checks that the setting (:func:`recovery_setting`) matches."""
    from tqdm import tqdm

    cfg.validate()
    depth = len(teacher.blocks)
    kept = check_kept(kept, depth)
    if len(student.blocks) != len(kept):
        raise ConfigError(f"the student has {len(student.blocks)} blocks, {len(kept)} are kept")
    targets = feature_targets(kept, depth)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student.float().train()
    ema = copy.deepcopy(student).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    eta_min = cfg.lr * cfg.final_lr_ratio
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (eta_min + (cfg.lr - eta_min) * (1 + math.cos(math.pi * min(s, cfg.steps) / max(cfg.steps, 1))) / 2)
        / cfg.lr)
    start, log = 0, []
    running, n_run = {"loss": 0.0, "kd": 0.0, "gt": 0.0, "feat": 0.0}, 0
    if resume is not None:
        tensors, state = resume
        student.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, log = int(state["step"]), [dict(r) for r in state["log"]]
        running, n_run = dict(state["running"]), int(state["n_run"])

    def checkpoint(step: int) -> None:
        if save is not None:
            save(step, {"model": student.state_dict(), "ema": ema.state_dict()},
                 {"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, "log": log,
                  "running": dict(running), "n_run": n_run})

    bar = tqdm(range(start, cfg.steps), desc="masked-KD recovery", disable=not progress, leave=False,
               initial=start, total=cfg.steps)
    for step in bar:
        b = stream.batch(step)
        beta = cfg.beta_feat * (1 - step / max(cfg.steps - 1, 1))
        with torch.no_grad():
            v_t, f_t = _run(teacher, b.xt, b.t, b.y, set(targets))
        v_s, f_s = _run(student, b.xt, b.t, b.y)
        parts = masked_kd_loss(v_s, v_t, b.target, [f_s[k] for k in range(len(kept))], [f_t[i] for i in targets],
                               beta_feat=beta, alpha_kd=cfg.alpha_kd)
        if not torch.isfinite(parts["loss"]):
            raise FloatingPointError(f"recovery step {step}: non-finite loss; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, ps in zip(ema.parameters(), student.parameters()):
                pe.mul_(cfg.ema_decay).add_(ps.detach(), alpha=1 - cfg.ema_decay)
        for k in running:
            running[k] += float(parts[k])
        n_run += 1
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log.append({"step": step + 1, **{k: v / n_run for k, v in running.items()}})
            bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
            running, n_run = dict.fromkeys(running, 0.0), 0
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < cfg.steps:
            checkpoint(step + 1)
    if start < cfg.steps or resume is None:
        checkpoint(cfg.steps)
    return student.eval(), ema, log
