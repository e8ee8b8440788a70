"""TinyFusion (Fang et al., CVPR 2025): learnable depth pruning of a DiT.

The blocks are split into groups of ``M`` consecutive blocks, of which ``N`` are kept
(N:M). Each group holds one logit per N-of-M choice (``C(M, N)`` options); every training
sample draws a hard Gumbel-softmax choice (straight-through, eq. 4) and runs the kept
blocks, the others passing their input through (``x <- m block(x) + (1 - m) x``). The
logits are trained on the model's own training loss together with LoRA adapters on every
linear (rank 8, alpha 16, eq. 6), so a choice is scored by how well the pruned model
*recovers* rather than by its immediate loss. The decision is each group's argmax of the
EMA logits; the adapters are then dropped and the kept blocks of the *original* weights
form the pruned model, which recovers by masked knowledge distillation
(:func:`masked_kd_loss`, run by :mod:`.recovery`).

As in VainF/TinyFusion (``models_with_layer_pruning.py``, ``prune_by_learning.py``):
logits initialised to 0.02, scaled by ``scaling`` (100, its "one-hotness") before the
Gumbel-softmax, temperature ``tau`` linear from 4 to 0.1 over the search, AdamW (no weight
decay) at 1e-4 for the adapters and 10x for the logits, gradient clipping at 1, EMA 0.999.
One group of ``M = depth`` is the default here (every subset is an option, 20 for 3 of 6);
the reference's DiT-XL recipes use 1:2, 2:4 or 7:14 groups, selected by ``groups``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import DiT
from ..utils.seeding import seeded_generator
from .depth import FlowStream
from .lora import add_lora, lora_parameters

__all__ = ["DepthGates", "SearchResult", "gated_velocity", "masked_kd_loss", "parse_groups", "tinyfusion_search"]


def parse_groups(spec: str | Sequence[tuple[int, int]], depth: int, keep: Optional[int] = None) -> list[tuple[int, int]]:
    """Groups ``[(N, M), ...]`` from ``"N:M"`` (repeated to cover ``depth`` blocks) or a list;
    ``None``/empty with ``keep`` gives one group ``keep:depth``. Their ``M`` must sum to ``depth``."""
    if spec is None or spec == "":
        if keep is None:
            raise ConfigError("TinyFusion needs groups (N:M) or the number of blocks to keep")
        groups = [(keep, depth)]
    elif isinstance(spec, str):
        n_s, _, m_s = spec.partition(":")
        try:
            n, m = int(n_s), int(m_s)
        except ValueError:
            raise ConfigError(f"groups must look like N:M (e.g. 1:2), got {spec!r}") from None
        if m < 1 or depth % m:
            raise ConfigError(f"groups {spec}: M={m} must divide the depth {depth}")
        groups = [(n, m)] * (depth // m)
    else:
        groups = [(int(n), int(m)) for n, m in spec]
    if sum(m for _, m in groups) != depth:
        raise ConfigError(f"groups {groups} cover {sum(m for _, m in groups)} blocks, the model has {depth}")
    for n, m in groups:
        if not 1 <= n <= m:
            raise ConfigError(f"group {n}:{m}: keep between 1 and {m} blocks")
    if keep is not None and sum(n for n, _ in groups) != keep:
        raise ConfigError(f"groups {groups} keep {sum(n for n, _ in groups)} blocks, asked to keep {keep}")
    return groups


class DepthGates(nn.Module):
    """One logit per N-of-M choice of every group; ``options[g]`` is the ``[C(M, N), M]``
    0/1 table of group ``g``'s choices (the reference's ``generate_binary_tensor``)."""

    def __init__(self, groups: Sequence[tuple[int, int]], init: float = 0.02):
        super().__init__()
        self.groups = [tuple(g) for g in groups]
        self.options = []
        for n, m in self.groups:
            table = torch.zeros(len(list(itertools.combinations(range(m), n))), m)
            for r, idx in enumerate(itertools.combinations(range(m), n)):
                table[r, list(idx)] = 1.0
            self.options.append(table)
        self.logits = nn.ParameterList(nn.Parameter(torch.full((len(t),), init)) for t in self.options)

    def sample(self, batch: int, tau: float, scaling: float, generator: torch.Generator) -> Tensor:
        """Per-sample hard masks ``[batch, depth]`` (straight-through Gumbel-softmax of
        ``scaling * logits`` at temperature ``tau``; gradients reach the logits)."""
        masks = []
        for logits, table in zip(self.logits, self.options):
            u = torch.rand(batch, len(table), generator=generator).clamp_(1e-10, 1.0)
            gumbel = -torch.log(-torch.log(u)).to(logits.device)
            soft = F.softmax((logits.unsqueeze(0) * scaling + gumbel) / tau, dim=-1)
            hard = F.one_hot(soft.argmax(-1), len(table)).to(soft.dtype)
            choice = hard - soft.detach() + soft
            masks.append(choice @ table.to(choice.device))
        return torch.cat(masks, dim=1)

    def probabilities(self, scaling: float) -> list[list[float]]:
        """``softmax(scaling * logits)`` of every group, as lists."""
        return [F.softmax(lg.detach() * scaling, dim=-1).tolist() for lg in self.logits]

    def decision(self) -> list[int]:
        """The kept block indices: each group's most probable choice, offset by its position."""
        kept, offset = [], 0
        for logits, table, (_, m) in zip(self.logits, self.options, self.groups):
            row = table[int(logits.detach().argmax())]
            kept += [offset + int(i) for i in row.nonzero().flatten()]
            offset += m
        return kept


def gated_velocity(model: DiT, masks: Tensor, xt: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """The model's velocity ``[B, C, H, W]`` with block ``i`` applied to sample ``b`` with
    weight ``masks[b, i]`` (0: skipped, its input passes through); ``masks [B, depth]``."""
    tokens, c = model.embed(xt, t, y)
    for i, block in enumerate(model.blocks):
        m = masks[:, i].to(tokens.dtype).view(-1, 1, 1)
        tokens = block(tokens, c) * m + tokens * (1 - m)
    return model.unpatchify(model.final_layer(tokens, c)).to(xt.dtype)


def masked_kd_loss(v_s: Tensor, v_t: Tensor, target: Tensor, feats_s: Sequence[Tensor], feats_t: Sequence[Tensor],
                   beta_feat: float, alpha_kd: float = 0.9) -> dict[str, Tensor]:
    """TinyFusion's masked knowledge distillation (``training_losses_kd_rep`` of its
    ``diffusion/gaussian_diffusion.py``), in velocity form.

    ``loss = alpha_kd ||v_s - v_t||^2 + (1 - alpha_kd) ||v_s - (eps - x0)||^2 + beta_feat L_feat``
    with per-sample means; ``L_feat`` averages, over the matched block pairs, the squared
    difference of the student's and the teacher's block outputs ``[B, N, D]`` after each
    is masked to its elements within two standard deviations of its per-sample mean (the
    massive activations are left out of the match). Returns the loss and its parts
    (scalars)."""
    kd = ((v_s.float() - v_t.float()) ** 2).flatten(1).mean(1)
    gt = ((v_s.float() - target.float()) ** 2).flatten(1).mean(1)
    feat = torch.zeros_like(kd)
    for fs, ft in zip(feats_s, feats_t):
        fs, ft = fs.float(), ft.float().detach()
        var_s, mean_s = torch.var_mean(fs, dim=(1, 2), keepdim=True)
        var_t, mean_t = torch.var_mean(ft, dim=(1, 2), keepdim=True)
        mask_s = (fs - mean_s).abs() < 2 * var_s.sqrt()
        mask_t = (ft - mean_t).abs() < 2 * var_t.sqrt()
        feat = feat + ((mask_s * fs - mask_t * ft) ** 2).flatten(1).mean(1)
    feat = feat / max(len(feats_s), 1)
    loss = alpha_kd * kd + (1 - alpha_kd) * gt + beta_feat * feat
    return {"loss": loss.mean(), "kd": kd.mean(), "gt": gt.mean(), "feat": feat.mean()}


@dataclass
class SearchResult:
    """What :func:`tinyfusion_search` found: the kept blocks, each group's final choice
    probabilities, and a trace ``[(step, kept, loss), ...]`` every ``log_every`` steps."""

    kept: list[int]
    probabilities: list[list[float]]
    trace: list[tuple[int, list[int], float]] = field(default_factory=list)
    seconds: float = 0.0


def tinyfusion_search(model: DiT, stream: FlowStream, groups: Sequence[tuple[int, int]], steps: int = 500,
                      lora_rank: int = 8, lora_alpha: float = 16.0, lr: float = 1e-4, gate_lr_scale: float = 10.0,
                      tau_range: tuple[float, float] = (4.0, 0.1), scaling_range: tuple[float, float] = (100.0, 100.0),
                      ema_decay: float = 0.999, clip: float = 1.0, seed: int = 0, log_every: int = 50,
                      progress: bool = True) -> SearchResult:
    """Learn which blocks to keep (module docstring). ``model`` is not modified (a copy
    carries the adapters); ``stream`` gives the training batches; ``steps`` of AdamW.
    Returns the :class:`SearchResult`; the pruned model is
    :func:`flowdit.compress.depth.keep_blocks` of the original ``model`` with ``.kept``."""
    import time

    from tqdm import tqdm

    if steps < 1:
        raise ConfigError(f"TinyFusion search steps must be >= 1, got {steps}")
    t_start = time.perf_counter()
    work = copy.deepcopy(model).float().train()
    for p in work.parameters():
        p.requires_grad_(False)
    add_lora(work, rank=lora_rank, alpha=lora_alpha)
    gates = DepthGates(groups)
    ema_logits = [lg.detach().clone() for lg in gates.logits]
    adapters = lora_parameters(work)
    opt = torch.optim.AdamW([{"params": adapters, "lr": lr},
                             {"params": list(gates.parameters()), "lr": gate_lr_scale * lr}], lr=lr, weight_decay=0.0)
    g = seeded_generator(seed, 0x7F)
    trace, running = [], []
    bar = tqdm(range(steps), desc="tinyfusion search", disable=not progress, leave=False)
    for step in bar:
        frac = step / max(steps - 1, 1)
        tau = tau_range[0] + (tau_range[1] - tau_range[0]) * frac
        scaling = scaling_range[0] + (scaling_range[1] - scaling_range[0]) * frac
        b = stream.batch(step)
        masks = gates.sample(b.x0.shape[0], tau, scaling, g)
        v = gated_velocity(work, masks, b.xt, b.t, b.y)
        loss = ((v.float() - b.target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(loss):  # the reference skips the update of a NaN loss
            torch.nn.utils.clip_grad_norm_(adapters + list(gates.parameters()), clip)
            opt.step()
        with torch.no_grad():
            for e, lg in zip(ema_logits, gates.logits):
                e.mul_(ema_decay).add_(lg.detach(), alpha=1 - ema_decay)
        running.append(float(loss))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            ema_gates = _with_logits(gates, ema_logits)
            trace.append((step + 1, ema_gates.decision(), sum(running) / len(running)))
            bar.set_postfix(loss=f"{trace[-1][2]:.4f}", kept=",".join(map(str, trace[-1][1])))
            running = []
    final = _with_logits(gates, ema_logits)
    return SearchResult(final.decision(), final.probabilities(scaling_range[1]), trace, time.perf_counter() - t_start)


def _with_logits(gates: DepthGates, logits: Sequence[Tensor]) -> DepthGates:
    out = DepthGates(gates.groups)
    with torch.no_grad():
        for p, v in zip(out.logits, logits):
            p.copy_(v)
    return out
