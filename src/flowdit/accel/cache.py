"""A training-free cache is a gate combined with a reuse.

``Cache`` runs one model call as::

    h = blocks[:gate.prefix](x)                  # only for gates that look at early blocks
    if gate.skip(call, st, reuse.ready(st)):     # decide: skip this call?
        return reuse.supply(call, st)            #   the stack output from the reuse's state
    out = reuse.record(call, st)                 # run blocks[prefix:] from h, keep what skips need
    gate.full(call, st, out)                     # the gate records what its next decisions need
    return out

``call`` (``Call``) carries the model, the stack input ``x`` (``call.tokens``), the
conditioning, the step context, the call index, the blocks already run
(``call.start``) and their output (``call.hidden``); ``st`` is the branch's state dict
(``BlockPolicyBase.state``), shared by gate and reuse under separate keys. Gates are in
``flowdit.accel.gates``, reuses in ``flowdit.accel.reuses``.

The methods named after papers (FORA, Delta-DiT, TaylorSeer, FBCache, TeaCache,
CG-Taylor) are *named combinations*: ``Cache`` subclasses in their own modules whose
``__init__`` takes and validates the method's parameters and calls ``combine`` with a
gate and a reuse. Any other pairing needs no class: the generic spec
``cache:gate=NAME,reuse=NAME,key=value,...`` builds it, e.g.
``cache:gate=fbcache,reuse=taylor,threshold=0.1,order=1``.
"""

from __future__ import annotations

from typing import Any

import torch

from flowdit.errors import ConfigError

from .base import BlockPolicyBase, step_of
from .gates import GATES, Gate
from .reuses import REUSES, Reuse

__all__ = ["Cache", "Call", "cache_keys"]


class Call:
    """One model call as a gate and a reuse see it.

    ``tokens [B, N, D]``: the stack input; ``c_act [B, D]``: the activated conditioning;
    ``step``: the model-call index (``ctx.step``); ``num_steps``: the expected number of
    calls (``None`` for adaptive solvers); ``start``: the leading blocks already run by
    the cache for its gate; ``hidden [B, N, D]``: their output (``tokens`` when
    ``start == 0``); ``signal``: the gate's per-call value, kept from ``skip`` to ``full``.
    """

    __slots__ = ("policy", "model", "tokens", "c_act", "ctx", "step", "num_steps", "start", "hidden", "signal")

    def __init__(self, policy: BlockPolicyBase, model: Any, tokens: torch.Tensor, c_act: torch.Tensor, ctx: Any):
        self.policy, self.model, self.tokens, self.c_act, self.ctx = policy, model, tokens, c_act, ctx
        self.step = step_of(ctx)
        self.num_steps = getattr(ctx, "num_steps", None)
        self.start, self.hidden, self.signal = 0, tokens, None


def cache_keys(gate: str, reuse: str) -> list[str]:
    """The parameter names of ``cache:gate=GATE,reuse=REUSE`` besides ``gate``, ``reuse``
    and ``cfg``: the gate's, then the reuse's that the gate does not share."""
    return list(GATES[gate].spec) + [k for k in REUSES[reuse].spec if k not in GATES[gate].spec]


class Cache(BlockPolicyBase):
    """A block policy made of one gate and one reuse (see module).

    Generic form: ``Cache(gate="fbcache", reuse="taylor", threshold=0.1, order=1)``, the
    spec ``cache:gate=fbcache,reuse=taylor,threshold=0.1,order=1``. The keys are the
    gate's and the reuse's (``cache_keys``; a key both take, such as ``warmup``, is given
    once and goes to both), with their defaults. Unknown gates, reuses and keys are refused
    naming what is allowed. A named combination subclasses ``Cache``, validates its own
    parameters and calls ``combine(gate, reuse)``.

    Args:
        gate: a name in ``gates.GATES``.
        reuse: a name in ``reuses.REUSES``.
        cfg: ``"batched"`` or ``"split"`` (see ``BlockPolicyBase``).
        **params: the gate's and the reuse's parameters.
    """

    name = "cache"

    def __init__(self, gate: str | None = None, reuse: str | None = None, cfg: str = "batched", **params: Any):
        super().__init__(cfg)
        self._gate: Gate | None = None
        self._reuse: Reuse | None = None
        if type(self) is not Cache and gate is None and reuse is None and not params:
            return  # a named combination: its __init__ calls combine()
        gate_cls = self._lookup("gate", gate, GATES)
        reuse_cls = self._lookup("reuse", reuse, REUSES)
        keys = cache_keys(gate_cls.name, reuse_cls.name)
        unknown = [k for k in params if k not in keys]
        if unknown:
            raise ConfigError(f"{self.name}: gate={gate_cls.name} with reuse={reuse_cls.name} has no parameter "
                              f"{unknown[0]!r}; valid: {', '.join(['gate', 'reuse', *keys, 'cfg'])}")
        self.gate, self.reuse = gate_cls.name, reuse_cls.name
        values = {}
        for key in keys:
            default, check = gate_cls.spec[key] if key in gate_cls.spec else reuse_cls.spec[key]
            values[key] = check(self.name, key, params.get(key, default))
            setattr(self, key, values[key])
        self.combine(gate_cls.from_spec(**{k: values[k] for k in gate_cls.spec}),
                     reuse_cls.from_spec(**{k: values[k] for k in reuse_cls.spec}))

    def _lookup(self, what: str, value: Any, table: dict) -> type:
        if not isinstance(value, str) or value.strip().lower() not in table:
            got = "none given" if value is None else f"got {value!r}"
            raise ConfigError(f"{self.name}: {what} must be one of {', '.join(table)} ({got})")
        return table[value.strip().lower()]

    def combine(self, gate: Gate, reuse: Reuse) -> None:
        """Use ``gate`` to decide and ``reuse`` to supply skipped calls."""
        if gate.prefix and not reuse.takes_prefix:
            raise ConfigError(f"{self.name}: reuse {reuse.name} needs the whole stack, but gate {gate.name} runs "
                              f"the first {gate.prefix} block(s) itself; use a gate without a prefix (schedule, "
                              f"teacache)")
        self._gate, self._reuse = gate, reuse

    @property
    def requires(self) -> frozenset[str]:
        """The capabilities the gate and the reuse need (``base.MODEL_CAPABILITIES``)."""
        if self._gate is None:
            return frozenset()
        return self._gate.requires | self._reuse.requires

    def params(self) -> dict:
        p = super().params()
        if isinstance(p.get("coeffs"), tuple):
            p["coeffs"] = "/".join(f"{c:.6g}" for c in p["coeffs"])
        return p

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        gate, reuse = self._gate, self._reuse
        if gate is None:
            raise ConfigError(f"{self.name}: no gate and reuse combined")
        call = Call(self, model, tokens, c_act, ctx)
        if gate.prefix:
            call.hidden = self.run_blocks(model, tokens, c_act, ctx, 0, gate.prefix)
            call.start = gate.prefix
        if gate.skip(call, st, reuse.ready(st)):
            return reuse.supply(call, st)
        self.stats.full_calls += 1
        out = reuse.record(call, st)
        gate.full(call, st, out)
        return out
