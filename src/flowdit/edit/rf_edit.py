"""RF-Edit (Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing",
arXiv 2411.04746): feature sharing between inversion and regeneration.

While the source image is inverted under its own condition, chosen self-attention
layers record their value tensors ``V [B, H, N, Dh]``; while the inverted noise is
regenerated under the *target* condition, the first ``k`` regeneration steps replace
their freshly computed ``V`` by the recorded one. Queries and keys still come from the
edited trajectory, so attention decides *where* to read while the values carry the
source's appearance: the layout and style survive, the condition changes the content.

Matching inversion and regeneration evaluations: inversion step ``[t_i, t_{i+1}]`` and
regeneration step ``[t_{i+1}, t_i]`` cover the same interval, so features are keyed by
the interval (its two endpoints, rounded) and by the evaluation's slot inside it:
``"mid"`` for an evaluation strictly inside (the midpoint of RF-Solver-2 / FireFlow, at
the same time in both directions), ``"edge0"``, ``"edge1"`` for evaluations on the
endpoints in the order they run (the first evaluation of a step is paired with the
first, as the paper's code pairs them by time and by first / second evaluation).
FireFlow's reused slope is no evaluation: those steps store and inject the midpoint only.

Which layers share values is the ``blocks`` option (``edit_blocks``): a list or ``range``
of indices into ``model.attention_modules()``. The default for a DiT is flowdit's choice,
the second half of the blocks; the reference shares them in FLUX's single-stream blocks
20-37 only (``default_edit_blocks`` gives the mapping), and a model with that structure
names the reference's set through ``rf_edit_blocks()``.

Everything goes through the attention-processor extension point: ``VFeatureProcessor``
is installed on the chosen blocks and driven by an ``EditContext`` handed to the model
as ``model(x, t, y, ctx=...)``; the model itself knows nothing about editing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flowdit.errors import ConfigError
from flowdit.inference.velocity import model_velocity
from flowdit.models.attention import merge_heads, qkv_heads
from flowdit.sampling.sample import sample
from flowdit.sampling.solvers import Solver, build_solver

from .inversion import inversion_grid, sampling_grid

__all__ = ["EditContext", "VFeatureProcessor", "KeyedSolver", "feature_sharing", "rf_edit", "EditResult",
           "default_edit_blocks", "edit_blocks"]


@dataclass
class EditContext:
    """The per-call state that RF-Edit's processors read.

    Attributes:
        mode: ``"record"`` (store V), ``"inject"`` (replace V by the stored one) or ``"off"``.
        store: ``{(interval, slot, block): V [B, H, N, Dh]}``.
        key: ``((t_lo, t_hi), slot)`` of the evaluation being run (set by ``KeyedSolver``).
        block_policy: always ``None`` here; present because the DiT asks its ``ctx`` for one.
    """

    mode: str = "off"
    store: dict = field(default_factory=dict)
    key: Any = None
    block_policy: Any = None


class VFeatureProcessor:
    """Self-attention that records or injects the value tensor of block ``index``.

    Same math as the default SDPA processor; in ``inject`` mode the stored
    ``V [B, H, N, Dh]`` replaces the computed one (repeated along the batch when the
    call runs several stacked copies, e.g. the cond/uncond halves of CFG).
    """

    def __init__(self, index: int):
        self.index = index

    def __call__(self, attn, x: Tensor, ctx: Any = None) -> Tensor:
        q, k, v = qkv_heads(attn, x)
        mode = getattr(ctx, "mode", "off")
        if mode != "off" and ctx.key is not None:
            key = (*ctx.key, self.index)
            if mode == "record":
                ctx.store[key] = v.detach().clone()
            elif mode == "inject" and key in ctx.store:
                stored = ctx.store[key]
                reps = v.shape[0] // stored.shape[0]
                if reps * stored.shape[0] != v.shape[0]:
                    raise ConfigError(f"RF-Edit: stored features of batch {stored.shape[0]} cannot fill a batch of {v.shape[0]}")
                v = stored.to(v.dtype).repeat(reps, 1, 1, 1) if reps > 1 else stored.to(v.dtype)
        return attn.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class KeyedSolver(Solver):
    """Wraps a solver so that every velocity evaluation of a step carries its key
    ``(interval, slot)`` in ``ctx.key``, and sets ``ctx.mode`` per step.

    ``modes(i) -> str`` gives the mode of step ``i`` (0-based, in the order run).
    """

    def __init__(self, solver: Any, ctx: EditContext, modes):
        self.inner = build_solver(solver)
        self.ctx, self.modes = ctx, modes
        self.name = getattr(self.inner, "name", "solver")
        self.nfe_per_step = getattr(self.inner, "nfe_per_step", 1)
        self.order = getattr(self.inner, "order", 1)
        self.index = 0

    def step(self, model_fn, x, t_cur, t_next, state=None):
        lo, hi = sorted((round(float(t_cur), 6), round(float(t_next), 6)))
        edges = [0]
        ctx = self.ctx

        def keyed(xx, tt):
            t = round(float(tt.reshape(-1)[0]), 6)
            if lo < t < hi:
                slot = "mid"
            else:
                slot = f"edge{edges[0]}"
                edges[0] += 1
            ctx.key = ((lo, hi), slot)
            return model_fn(xx, tt)

        ctx.mode = self.modes(self.index)
        try:
            out = self.inner.step(keyed, x, t_cur, t_next, state)
        finally:
            ctx.mode, ctx.key = "off", None
            self.index += 1
        return out


def default_edit_blocks(depth: int) -> list[int]:
    """flowdit's block set for a DiT of ``depth`` blocks: the second half,
    ``range(depth // 2, depth)``.

    The reference (RF-Solver-Edit, ``FLUX_Image_Edit/src/flux/modules/layers.py``,
    ``SingleStreamBlock.forward``: ``info['id'] > 19``) shares values only in FLUX's
    single-stream blocks 20-37 (FLUX.1 has 19 double-stream and 38 single-stream blocks),
    the late blocks where the content is settled. A DiT has no double-stream part, so
    flowdit takes the late half of its blocks; on FLUX's 38 single-stream blocks that rule
    would give 19-37, one block more than the reference, and on all 57 blocks 28-56.
    """
    return list(range(depth // 2, depth))


def edit_blocks(model, blocks: Optional[Iterable[int]] = None) -> list[int]:
    """The attention layers RF-Edit shares values in, as sorted indices into
    ``model.attention_modules()``.

    ``blocks``: an iterable of indices (a list, a ``range``), used as given. ``None``: the
    model's own choice when it defines ``rf_edit_blocks()`` (a model with the reference's
    structure, e.g. a FLUX-style MMDiT, returns the reference's single-stream blocks 20-37
    there), else ``default_edit_blocks`` (the second half, for a DiT).
    """
    n = len(model.attention_modules())
    if blocks is None:
        hook = getattr(model, "rf_edit_blocks", None)
        blocks = hook() if callable(hook) else default_edit_blocks(n)
    try:
        chosen = sorted(set(int(b) for b in blocks))
    except (TypeError, ValueError):
        raise ConfigError(f"RF-Edit blocks must be block indices, got {blocks!r}") from None
    bad = [b for b in chosen if not 0 <= b < n]
    if bad:
        raise ConfigError(f"RF-Edit blocks {bad} out of range 0..{n - 1}")
    if not chosen:
        raise ConfigError("RF-Edit blocks is empty: name at least one block")
    return chosen


@contextmanager
def feature_sharing(model, blocks: Optional[Iterable[int]] = None) -> Iterator[EditContext]:
    """Install ``VFeatureProcessor`` on ``edit_blocks(model, blocks)`` for the duration of the
    block, restoring the previous processors after; yields a fresh ``EditContext``."""
    attns = model.attention_modules()
    blocks = edit_blocks(model, blocks)
    saved = {i: attns[i].processor for i in blocks}
    model.set_attn_processor({i: VFeatureProcessor(i) for i in blocks})
    try:
        yield EditContext()
    finally:
        model.set_attn_processor(saved)


@dataclass
class EditResult:
    """``images [N, C, H, W]`` (float32, CPU, unclamped), the inverted ``noise``, and NFE
    per image of inversion and of regeneration."""

    images: Tensor
    noise: Tensor
    nfe_invert: int
    nfe_edit: int


@torch.no_grad()
def rf_edit(model, images: Tensor, source: Optional[Tensor], target: Optional[Tensor], inject_steps: int = 2,
            solver: Any = "rf2", steps: int = 10, shift: float = 1.0, blocks: Optional[Iterable[int]] = None,
            cfg_scale: float = 1.0, amp_dtype: Optional[torch.dtype] = None, batch_size: int = 256,
            device: Any = "cpu") -> EditResult:
    """Edit images ``[N, C, H, W]`` from condition ``source [N]`` to ``target [N]`` (RF-Edit).

    Inverts unguided under ``source`` recording V on ``blocks`` for the steps that will be
    injected, then regenerates under ``target`` (guided with ``cfg_scale``) injecting V in the
    first ``inject_steps`` steps. ``inject_steps = 0`` is plain inversion + regeneration.
    ``blocks``: indices into ``model.attention_modules()`` (a list or a ``range``); ``None``
    takes ``edit_blocks``' default (the second half of a DiT's blocks).
    """
    if int(inject_steps) != inject_steps or not 0 <= inject_steps <= steps:
        raise ConfigError(f"inject_steps must be an integer in 0..steps={steps}, got {inject_steps!r}")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ConfigError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', images)}")
    for name, lab in (("source", source), ("target", target)):
        if lab is not None and (lab.dim() != 1 or lab.shape[0] != images.shape[0]):
            raise ConfigError(f"{name} labels must be [N] = [{images.shape[0]}], got {tuple(lab.shape)}")
    k = int(inject_steps)
    device = torch.device(device)
    model.eval()
    outs, noises, nfe_inv, nfe_edit = [], [], 0, 0
    with feature_sharing(model, blocks) as ctx:
        for lo in range(0, len(images), batch_size):
            x = images[lo:lo + batch_size].to(device).float()
            ys = None if source is None else source[lo:lo + batch_size].to(device)
            yt = None if target is None else target[lo:lo + batch_size].to(device)
            ctx.store.clear()
            # Inversion step i mirrors regeneration step steps-1-i: record only those injected later.
            inv = KeyedSolver(solver, ctx, lambda i: "record" if i >= steps - k else "off")
            z = sample(model_velocity(model, ys, 1.0, amp_dtype, ctx=ctx), x, inv,
                       schedule=inversion_grid(steps, shift))
            gen = KeyedSolver(solver, ctx, lambda i: "inject" if i < k else "off")
            out = sample(model_velocity(model, yt, cfg_scale, amp_dtype, ctx=ctx), z.x, gen,
                         schedule=sampling_grid(steps, shift))
            ctx.store.clear()
            outs.append(out.x.float().cpu())
            noises.append(z.x.float().cpu())
            nfe_inv, nfe_edit = max(nfe_inv, z.nfe), max(nfe_edit, out.nfe)
    return EditResult(torch.cat(outs), torch.cat(noises), nfe_inv, nfe_edit)
