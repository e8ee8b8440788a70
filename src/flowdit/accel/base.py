"""Shared machinery of the block policies: per-branch state, compute accounting.

A policy is created once (from a spec such as ``taylorseer:interval=4,order=2``), handed
to the sampler inside a ``StepContext``, and reset by the sampling loop at the start of
every sampling call. Its state is kept per CFG branch (``ctx.branch``) and starts afresh
whenever the token shape of a branch changes (a new batch size, a guidance interval
that switches between ``B`` and ``2B`` rows), so no tensor is ever reused across
unrelated batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowdit.errors import ConfigError
from flowdit.sampling.context import CFG_MODES, StepContext

__all__ = ["BlockPolicyBase", "PolicyStats", "block_flops", "check_policy", "full_compute", "gated_add_",
           "modulation_flops", "replay_gated", "MODEL_CAPABILITIES"]


def block_flops(model: Any, n_query: int, n_key: int | None = None) -> float:
    """Multiply-add FLOPs (2 per MAC) of one DiT block for one batch row.

    ``n_query`` tokens are updated and attend to ``n_key`` keys (default ``n_query``):
    QKV and output projections ``8 n_q D^2``, attention scores and mixing ``4 n_q n_k D``,
    MLP ``4 n_q D H`` (``H = mlp_ratio D``), adaLN modulation ``12 D^2``. Layer norms,
    softmax and element-wise work are left out (they are lower order).
    """
    own = getattr(model, "block_flops", None)
    if callable(own):
        # A model adapter that knows its own block structure (diffusers' joint and
        # single-stream blocks) counts its FLOPs itself.
        return float(own(n_query, n_key))
    cfg = model.config
    d = cfg.hidden_size
    h = int(cfg.hidden_size * cfg.mlp_ratio)
    n_key = n_query if n_key is None else n_key
    return 8.0 * n_query * d * d + 4.0 * n_query * n_key * d + 4.0 * n_query * d * h + 12.0 * d * d


@dataclass
class PolicyStats:
    """Compute a policy actually spent since it was built (or ``reset_stats``).

    ``calls``: model calls seen (each CFG branch counts when run separately);
    ``full_calls``: calls that ran every block on every token; ``block_evals``: blocks
    run, in units of one block on all tokens of one call (partial token updates count
    as a fraction); ``flops``: block FLOPs summed over batch rows (``block_flops``).
    """

    calls: int = 0
    full_calls: int = 0
    block_evals: float = 0.0
    flops: float = 0.0


def modulation_flops(model: Any) -> float:
    """FLOPs (2 per MAC) of one block's adaLN modulation vectors for one batch row: the
    model's own count (``model.modulation_flops()``, a diffusers adapter) or DiT's
    ``12 D^2`` (one ``D -> 6D`` layer)."""
    own = getattr(model, "modulation_flops", None)
    if callable(own):
        return float(own())
    d = model.config.hidden_size
    return 12.0 * d * d


def gated_add_(out: torch.Tensor, gate: torch.Tensor | None, branch: torch.Tensor | None) -> torch.Tensor:
    """``out += gate * branch`` in place, ``out`` and ``branch`` ``[B, N, D]``.

    ``gate`` is ``[B, D]`` (one gate for every token: flowdit's DiT), broadcast over the
    tokens, or ``[B, N, D]`` (per token: the joint blocks of SD3 / FLUX, whose text and
    image rows have separate gates). A ``None`` branch (a block with a single gated
    branch) adds nothing.
    """
    if branch is None:
        return out
    return out.addcmul_(gate.unsqueeze(1) if gate.dim() == 2 else gate, branch)


def replay_gated(blocks: Any, tokens: torch.Tensor, c_act: torch.Tensor,
                 branches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """``x_{i+1} = x_i + g_a^i(c) a_i + g_m^i(c) m_i`` over ``blocks`` from ``x_0 = tokens
    [B, N, D]``, with each block's current gates ``block.gates(c_act)`` (``gated_add_``)
    and the supplied pre-gate branch outputs ``branches[i] = (a_i, m_i)``; accumulated in
    fp32 and returned in ``tokens.dtype``."""
    # Only the stack's output is read on a cached call, so the gated sums can be
    # accumulated in place into one fp32 copy of the residual stream (two fused
    # multiply-adds a block instead of four element-wise passes with temporaries).
    out = tokens.float().clone()
    for block, (a, m) in zip(blocks, branches):
        g_a, g_m = block.gates(c_act)
        gated_add_(gated_add_(out, g_a, a), g_m, m)
    return out.to(tokens.dtype)


def full_compute(model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any, start: int = 0,
                 stop: int | None = None) -> torch.Tensor:
    """Run ``model.blocks[start:stop]`` in order on ``tokens [B, N, D]``."""
    for block in model.blocks[start:stop]:
        tokens = block(tokens, c_act, ctx)
    return tokens


class BlockPolicyBase:
    """Base class of the block policies (see ``flowdit.sampling.context.BlockPolicy``).

    Subclasses implement ``decide_and_run``; ``run`` does the bookkeeping around it.
    ``cfg`` selects how guided evaluations run: ``"batched"`` (one call of ``2B`` rows,
    one state) or ``"split"`` (one call per branch, one state per branch).
    """

    name = "none"
    requires: frozenset[str] = frozenset()
    """What the policy needs from the model beyond running its blocks in order (see
    ``MODEL_CAPABILITIES``); a model adapter that lacks one refuses the policy by name."""

    def __init__(self, cfg: str = "batched"):
        if cfg not in CFG_MODES:
            raise ConfigError(f"{self.name}: cfg must be one of {', '.join(CFG_MODES)}, got {cfg!r}")
        self.cfg_mode = cfg
        self._states: dict[str, dict] = {}
        self.stats = PolicyStats()

    def reset(self) -> None:
        """Forget every cached tensor (the sampling loop calls this at the start of every
        sampling call). The statistics keep accumulating; see ``reset_stats``."""
        self._states = {}

    def reset_stats(self) -> None:
        """Zero the compute statistics."""
        self.stats = PolicyStats()

    def state_bytes(self) -> int:
        """Bytes held by the cached tensors of every branch."""
        seen, total = set(), 0

        def visit(obj):
            nonlocal total
            if isinstance(obj, torch.Tensor):
                if id(obj) not in seen:
                    seen.add(id(obj))
                    total += obj.numel() * obj.element_size()
            elif isinstance(obj, dict):
                for v in obj.values():
                    visit(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    visit(v)
            elif hasattr(obj, "__dict__"):
                visit(vars(obj))

        visit(self._states)
        return total

    def state(self, ctx: StepContext | Any, tokens: torch.Tensor) -> dict:
        """The state dict of the current branch, fresh if the token shape changed."""
        key = getattr(ctx, "branch", "cond") or "cond"
        st = self._states.get(key)
        if st is None or st.get("_shape") != tuple(tokens.shape):
            st = {"_shape": tuple(tokens.shape)}
            self._states[key] = st
        return st

    def run_blocks(self, model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
        """Run a slice of the stack on all tokens and account for it."""
        depth = len(model.blocks)
        stop = depth if stop is None else stop
        n = stop - start
        self.stats.block_evals += n / depth
        self.stats.flops += n * tokens.shape[0] * block_flops(model, tokens.shape[1])
        return full_compute(model, tokens, c_act, ctx, start, stop)

    def run_blocks_keep(self, model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any,
                        keep: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run every block; also return the hidden states entering the blocks in ``keep``
        (index ``depth`` is the output)."""
        depth = len(model.blocks)
        kept = {}
        for i, block in enumerate(model.blocks):
            if i in keep:
                kept[i] = tokens
            tokens = block(tokens, c_act, ctx)
        kept[depth] = tokens
        self.stats.block_evals += 1.0
        self.stats.flops += depth * tokens.shape[0] * block_flops(model, tokens.shape[1])
        return tokens, kept

    def run_blocks_branches(self, model: Any, tokens: torch.Tensor, c_act: torch.Tensor,
                            ctx: Any) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run every block on all tokens and return, with the output, each block's attention
        and MLP outputs *before* their adaLN gates: ``[(a_0, m_0), ..., (a_{L-1}, m_{L-1})]``,
        each ``[B, N, D]`` (see ``DiTBlock.forward_branches``; ``m_i`` is ``None`` for a
        block with one gated branch, FLUX's single-stream block)."""
        branches = []
        for block in model.blocks:
            tokens, a, m = block.forward_branches(tokens, c_act, ctx)
            branches.append((a, m))
        depth = len(model.blocks)
        self.stats.block_evals += 1.0
        self.stats.flops += depth * tokens.shape[0] * block_flops(model, tokens.shape[1])
        return tokens, branches

    def replay_blocks(self, model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any,
                      branches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """A cached call of the whole stack: block ``i`` adds the supplied pre-gate outputs
        ``(a_i, m_i)`` multiplied by the *current* call's gates, ``x += g_a(c) a_i`` then
        ``x += g_m(c) m_i`` (``replay_gated``: gates ``[B, D]`` or per token ``[B, N, D]``;
        a block with one branch has ``m_i = None``). Only the modulation vectors are
        computed (``modulation_flops`` a block and row), so no block evaluation is counted."""
        out = replay_gated(model.blocks, tokens, c_act, branches)
        self.stats.flops += modulation_flops(model) * len(model.blocks) * tokens.shape[0]
        return out

    def run(self, model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Run the block stack for one model call: ``tokens [B, N, D] -> [B, N, D]``."""
        self.stats.calls += 1
        return self.decide_and_run(model, tokens, c_act, ctx, self.state(ctx, tokens))

    def decide_and_run(self, model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any,
                       st: dict) -> torch.Tensor:
        """Policy-specific body of ``run``; ``st`` is the branch's state dict."""
        self.stats.full_calls += 1
        return self.run_blocks(model, tokens, c_act, ctx)

    def params(self) -> dict:
        """The policy's parameters, for result tables."""
        out = {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("stats", "cfg_mode")}
        out["cfg"] = self.cfg_mode
        return out

    def __repr__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}:{args}" if args else self.name


class FullCompute(BlockPolicyBase):
    """Every block on every token: the uncached reference, with the same accounting."""

    name = "none"


def _positive_int(policy: str, key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{policy}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _in_range(policy: str, key: str, value: Any, lo: float, hi: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{policy}: {key} must be a number, got {value!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{policy}: {key} must lie in [{lo:g}, {hi:g}], got {value:g}")
    return value


def _flag(policy: str, key: str, value: Any) -> bool:
    """A yes/no parameter: ``True``/``False``, ``1``/``0`` or the words ``true``/``false``."""
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
        return value.strip().lower() in ("true", "yes")
    raise ConfigError(f"{policy}: {key} must be true or false (or 1 / 0), got {value!r}")


def step_of(ctx: Any) -> int:
    """The model-call index of ``ctx`` (0 without a context)."""
    return int(getattr(ctx, "step", 0) or 0)


def _choice(policy: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    """A parameter that takes one of a few words."""
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ConfigError(f"{policy}: {key} must be one of {', '.join(choices)}, got {value!r}")
    return value.strip().lower()


CACHE_TARGETS = ("blocks", "stack")

MODEL_CAPABILITIES = {
    "block_branches": "each block's attention and MLP outputs before their gates "
                      "(block.forward_branches, block.gates)",
    "token_layout": "image tokens on a square patch grid (model.patch_size, model.unpatchify)",
    "attention_processors": "swappable flowdit attention processors (block.attn.processor)",
}
"""Capabilities a policy may ``require``. flowdit's DiT has all of them; a model adapter
declares the ones it offers in ``capabilities``. For ``block_branches``,
``block.forward_branches(tokens, c, ctx, attn_out=None, mlp_out=None)`` returns ``(out, a,
m)`` (``m`` may be ``None`` for a block with one gated branch) and ``block.gates(c)``
returns ``(g_a, g_m)``, each ``[B, D]`` or per token ``[B, N, D]`` (``gated_add_``)."""


def check_policy(model: Any, policy: Any) -> None:
    """Refuse, in one line, a policy that needs a capability ``model`` lacks.

    Models without a ``capabilities`` attribute (flowdit's own) offer everything.
    """
    offered = getattr(model, "capabilities", None)
    if offered is None or policy is None:
        return
    missing = sorted(set(getattr(policy, "requires", ())) - set(offered))
    if missing:
        what = "; ".join(MODEL_CAPABILITIES.get(m, m) for m in missing)
        hint = " (use cache=stack)" if missing == ["block_branches"] else ""
        raise ConfigError(f"--accel {policy!r} needs {what}, which {type(model).__name__} does not offer{hint}")
