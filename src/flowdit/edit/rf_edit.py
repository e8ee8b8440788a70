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

Everything goes through the step context's hooks (``flowdit.core.hooks``): ``ValueSharing``
is an ``attention`` hook (it sees ``q, k, v`` of every attention layer and acts on the
chosen ones) and a ``begin_evaluation`` hook (it keys each evaluation from the context's
solver step, step interval and time). It sits in the same ``StepContext`` as any block
policy, so RF-Edit runs under a cache (``rf_edit(..., accel=...)``); the model itself
knows nothing about editing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from flowdit.core.hooks import BlockPolicy, Hook, StepContext
from flowdit.errors import ConfigError
from flowdit.inference.velocity import model_velocity
from flowdit.sampling.sample import ADAPTIVE_METHODS, sample
from flowdit.sampling.solvers import Solver

from .conditions import Cond, check_condition, decreasing_grid, take_rows

__all__ = ["ValueSharing", "value_sharing", "rf_edit", "EditResult", "default_edit_blocks", "edit_blocks",
           "MODES"]

MODES = ("off", "record", "inject")


class ValueSharing(Hook):
    """RF-Edit's value sharing as a step hook (``attention`` and ``begin_evaluation`` points).

    On the attention layers it was built for (``layers``: the modules, with their indices
    into ``model.attention_modules()``), an evaluation in ``record`` mode stores the value
    tensor ``V [B, H, N, Dh]`` under ``(interval, slot, index)``; one in ``inject`` mode
    replaces its freshly computed ``V`` by the stored one (repeated along the batch when
    the call stacks several copies, e.g. the two halves of batched CFG). ``plan(i)``
    gives the mode of solver step ``i`` of the current sampling call.

    Attributes:
        store: ``{((t_lo, t_hi), slot, index): V}``; kept across sampling calls (recorded
            while inverting, read while regenerating) and cleared by ``clear()``.
        plan: ``solver_step -> "off" | "record" | "inject"``.
        mode, key: the current evaluation's mode and ``((t_lo, t_hi), slot)``.
    """

    name = "rf_edit"

    def __init__(self, layers: dict[int, torch.nn.Module]):
        self._modules = dict(layers)  # index -> module, kept so the ids below stay valid
        self._index = {id(m): i for i, m in self._modules.items()}
        self.store: dict = {}
        self.plan: Callable[[int], str] = lambda i: "off"
        self.mode = "off"
        self.key: Optional[tuple] = None
        self._edges = 0

    @property
    def blocks(self) -> list[int]:
        """The indices of the sharing layers."""
        return sorted(self._modules)

    def clear(self) -> None:
        """Forget every recorded value."""
        self.store.clear()

    def reset(self) -> None:
        """Start a sampling call: per-call counters only; the store is kept."""
        self.mode, self.key, self._edges = "off", None, 0

    def begin_evaluation(self, ctx: StepContext) -> None:
        """Key the evaluation about to run by its step interval and slot (module docstring)."""
        if ctx.eval_in_step == 0:
            self._edges = 0
            self.mode = self.plan(ctx.solver_step)
            if self.mode not in MODES:
                raise ConfigError(f"RF-Edit: plan gave mode {self.mode!r}; valid: {', '.join(MODES)}")
        if ctx.t_step is None or ctx.t_next is None:
            self.key = None
            return
        lo, hi = sorted((round(float(ctx.t_step), 6), round(float(ctx.t_next), 6)))
        t = round(float(ctx.t), 6)
        if lo < t < hi:
            slot = "mid"
        else:
            slot = f"edge{self._edges}"
            self._edges += 1
        self.key = ((lo, hi), slot)

    def attention(self, attn, q: Tensor, k: Tensor, v: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        """Record or replace ``v [B, H, N, Dh]`` of a sharing layer; other layers pass through."""
        if self.mode == "off" or self.key is None:
            return q, k, v
        index = self._index.get(id(attn))
        if index is None:
            return q, k, v
        key = (*self.key, index)
        if self.mode == "record":
            self.store[key] = v.detach().clone()
        elif key in self.store:
            stored = self.store[key]
            reps = v.shape[0] // stored.shape[0]
            if reps * stored.shape[0] != v.shape[0] or stored.shape[1:] != v.shape[1:]:
                raise ConfigError(f"RF-Edit: stored values of shape {tuple(stored.shape)} cannot replace values of "
                                  f"shape {tuple(v.shape)} (a policy that changes the token count does not compose "
                                  "with value sharing)")
            v = stored.to(v.dtype).repeat(reps, 1, 1, 1) if reps > 1 else stored.to(v.dtype)
        return q, k, v


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


def value_sharing(model, blocks: Optional[Iterable[int]] = None) -> ValueSharing:
    """A ``ValueSharing`` hook on the attention layers ``edit_blocks(model, blocks)``, to be
    registered in a ``StepContext`` (``StepContext(hooks=[hook])``)."""
    attns = model.attention_modules()
    return ValueSharing({i: attns[i] for i in edit_blocks(model, blocks)})


@dataclass
class EditResult:
    """``images [N, C, H, W]`` (float32, CPU, unclamped), the inverted ``noise``, and NFE
    per image of inversion and of regeneration."""

    images: Tensor
    noise: Tensor
    nfe_invert: int
    nfe_edit: int


@torch.no_grad()
def rf_edit(model, images: Tensor, source: Optional[Cond], target: Optional[Cond], inject_steps: int = 2,
            solver: Union[str, Solver] = "rf2", steps: int = 10, shift: float = 1.0,
            blocks: Optional[Iterable[int]] = None, cfg_scale: float = 1.0, amp_dtype: Optional[torch.dtype] = None,
            batch_size: int = 256, device: Union[str, torch.device] = "cpu",
            policy: Optional[BlockPolicy] = None, negative: Optional[Cond] = None,
            grid: Optional[Tensor] = None) -> EditResult:
    """Edit images ``[N, C, H, W]`` from condition ``source`` to ``target`` (RF-Edit).

    Inverts unguided under ``source`` recording V on ``blocks`` for the steps that will be
    injected, then regenerates under ``target`` (guided with ``cfg_scale``) injecting V in the
    first ``inject_steps`` steps. ``inject_steps = 0`` is plain inversion + regeneration.

    Args:
        source, target: class indices ``[N]`` (``None``: the null class), or text
            conditions (dicts of ``[N, ...]`` tensors, e.g. a diffusers adapter's
            ``text_condition``).
        blocks: indices into ``model.attention_modules()`` (a list or a ``range``); ``None``
            takes ``edit_blocks``' default (the model's ``rf_edit_blocks()``, or the second
            half of a DiT's blocks).
        policy: a block policy (a cache, ``flowdit.accel.build_policy``) active in both
            passes next to the value sharing; its state restarts with each pass. Values are
            recorded only on calls that run the sharing layers, so a call a cache skips
            while inverting has nothing to inject later and regenerates with its own values.
        negative: the null condition of the guided regeneration (default: the model's
            ``null_class``); needed for a text-conditioned model with ``cfg_scale != 1``.
        grid: the sampling time grid (``[steps + 1]``, 1 -> 0; a pipeline's own); inversion
            runs it backwards. Default: ``sampling_grid(steps, shift)``.
    """
    if int(inject_steps) != inject_steps or not 0 <= inject_steps <= steps:
        raise ConfigError(f"inject_steps must be an integer in 0..steps={steps}, got {inject_steps!r}")
    if isinstance(solver, str) and solver.strip().lower() in ADAPTIVE_METHODS:
        raise ConfigError(f"RF-Edit pairs the evaluations of fixed steps; adaptive solver {solver!r} has none")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ConfigError(f"images must be a tensor [N, C, H, W], got {getattr(images, 'shape', images)}")
    for name, cond in (("source", source), ("target", target), ("negative", negative)):
        check_condition(name, cond, images.shape[0])
    if cfg_scale != 1.0 and negative is None and getattr(model, "null_class", None) is None:
        raise ConfigError("cfg_scale != 1 needs a negative condition for a model without a null class")
    gen_grid = decreasing_grid(grid, steps, shift)
    inv_grid = gen_grid.flip(0)
    if policy is not None and "token_layout" in getattr(policy, "requires", ()):
        raise ConfigError(f"RF-Edit cannot run under {policy!r}: it changes which tokens attention sees, "
                          "so recorded values would not line up")
    k = int(inject_steps)
    device = torch.device(device)
    model.eval()
    sharing = value_sharing(model, blocks)
    ctx = StepContext(block_policy=policy, hooks=[sharing])
    outs, noises, nfe_inv, nfe_edit = [], [], 0, 0
    for lo in range(0, len(images), batch_size):
        hi = lo + batch_size
        x = images[lo:hi].to(device).float()
        ys, yt, yn = (take_rows(c, lo, hi, device) for c in (source, target, negative))
        sharing.clear()
        # Inversion step i mirrors regeneration step steps-1-i: record only those injected later.
        sharing.plan = lambda i: "record" if i >= steps - k else "off"
        z = sample(model_velocity(model, ys, 1.0, amp_dtype, ctx=ctx), x, solver,
                   schedule=inv_grid, step_context=ctx)
        sharing.plan = lambda i: "inject" if i < k else "off"
        out = sample(model_velocity(model, yt, cfg_scale, amp_dtype, ctx=ctx, null=yn), z.x, solver,
                     schedule=gen_grid, step_context=ctx)
        sharing.clear()
        outs.append(out.x.float().cpu())
        noises.append(z.x.float().cpu())
        nfe_inv, nfe_edit = max(nfe_inv, z.nfe), max(nfe_edit, out.nfe)
    return EditResult(torch.cat(outs), torch.cat(noises), nfe_inv, nfe_edit)
