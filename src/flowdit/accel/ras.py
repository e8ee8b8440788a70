"""RAS: region-adaptive sampling, as in the authors' code (microsoft/RAS).

Liu et al. 2025, "Region-Adaptive Sampling for Diffusion Transformers" (arXiv
2502.10389). Reference code: ``src/ras/schedulers/ras_scheduling_flow_match_euler_discrete.py``
(``ras_selection`` and ``step``), ``src/ras/utils/ras_manager.py`` (the step schedule and the
defaults), ``src/ras/modules/attention_processor.py`` (the key/value cache) and the SD3
``transformer_forward.py`` (only the recomputed tokens enter the blocks).

**Steps.** The reference counts Euler steps ``s = 0 .. n - 1``; here a step is a model call
``k = ctx.step`` of ``n = ctx.num_steps`` (the two agree for Euler). Call ``k`` is a *RAS call*
when ``k >= warmup`` and ``k`` is not a dense call; every other call runs all tokens. The
indices ``warmup`` and ``dense`` are the reference's for a run of ``ref_steps`` steps and are
scaled to the run, ``i -> floor(i n / ref_steps + 1/2)`` (the identity when ``n == ref_steps``),
so the defaults keep the reference's fractions of the trajectory at any step count.

**Selection** (after call ``k`` when call ``k + 1`` is a RAS call; ``ras_selection``). With ``v``
the velocity ``[B, C, H, W]`` that the solver uses (guidance applied) and ``h = t_next - t_step``
the solver step (the reference's ``sigma_next - sigma``)::

    m[b, j] = mean over the p x p pixels of patch j of  std_c (h v)[b, c, pixel]   (metric=std)
    m      *= exp(starvation * drop[b, j])
    order   = argsort of m, ascending;  skip = int((1 - ratio) N)
    cached  = order[:int(skip (1 - high_ratio))]  +  order[N - int(skip high_ratio):]
    drop[cached] += 1

``drop`` starts at ``-(n + 1)`` for every patch at the start of each sampling call (the
reference's ``-len(sigmas)``) and grows only for cached patches. With the default
``high_ratio = 1`` the highest-scoring patches are cached and the others recomputed.
``metric=l2norm`` uses the L2 norm over channels instead of the std. ``select=paper_text``
recomputes the highest-scoring patches and caches the ``skip`` lowest (the reading of the
paper's text; the reference's ``high_ratio = 0``, whose slice ``indices[-0:]`` would cache
every patch there). A batch of several images gets one selection per image, shared by its
conditional and unconditional rows (the reference runs one image).

**RAS call.** Only the recomputed tokens run through the blocks. In attention they attend
to every token: the keys and values of the cached tokens come from a per-layer cache that
each full call fills and each RAS call updates at the recomputed tokens. The output of a
cached patch keeps its previous value (``after_output``). The reference replaces the cached
patches in the guided velocity; replacing them in each CFG row instead gives the same
guided velocity, since ``v_u + s (v_c - v_u)`` is computed elementwise from the kept rows
(the scale is fixed within a sampling call).

The selection needs the velocity of the previous call, which the sampling loop
(``flowdit.sampling.sample``) hands to ``after_velocity``; a model driven without it runs
every call in full.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flowdit.errors import ConfigError
from flowdit.models.attention import merge_heads, qkv_heads

from .base import BlockPolicyBase, _in_range, _positive_int, block_flops, step_of

__all__ = ["RAS", "KVCacheProcessor", "patchify", "parse_steps"]

METRICS = ("std", "l2norm")
SELECTS = ("code", "paper_text")


def patchify(v: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, p * p * C]`` in the DiT token order (inverse of ``unpatchify``)."""
    B, C, H, W = v.shape
    g = H // p
    x = v.reshape(B, C, g, p, g, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, g * g, p * p * C)


def parse_steps(policy: str, key: str, value) -> tuple[int, ...]:
    """Step indices from ``12/22`` (``/``-separated, as a spec value), ``none``, an int or a
    list of ints; raises ``ConfigError`` naming ``key`` otherwise."""
    if isinstance(value, str):
        text = value.strip().lower()
        parts = [] if text in ("", "none") else text.replace("+", "/").split("/")
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    out = []
    for part in parts:
        try:
            i = int(str(part).strip()) if not isinstance(part, bool) else None
        except ValueError:
            i = None
        if i is None or i < 0:
            raise ConfigError(f"{policy}: {key} must be step indices >= 0 separated by '/' "
                              f"(e.g. 12/22) or 'none', got {value!r}")
        out.append(i)
    return tuple(sorted(set(out)))


class KVCacheProcessor:
    """Attention for a subset of query tokens against all keys, from a key/value cache.

    ``idx`` (``[B, M]`` token indices, or ``None`` for all tokens) selects the tokens in
    the input ``x [B, M, D]``; their fresh keys and values overwrite the cache entries
    ``store[layer] = (k, v)`` (``[B, H, N, Dh]``) before attention over all ``N`` keys.
    """

    def __init__(self, store: dict, layer: int, idx: torch.Tensor | None):
        self.store, self.layer, self.idx = store, layer, idx

    def __call__(self, attn, x: torch.Tensor, ctx=None) -> torch.Tensor:
        q, k, v = qkv_heads(attn, x, ctx)
        if self.idx is not None:
            k_all, v_all = self.store[self.layer]
            B, H, M, Dh = k.shape
            index = self.idx[:, None, :, None].expand(B, H, M, Dh)
            k = k_all.scatter(2, index, k)
            v = v_all.scatter(2, index, v)
        self.store[self.layer] = (k, v)
        return attn.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


class RAS(BlockPolicyBase):
    """Region-adaptive sampling as a block policy (see the module docstring).

    Args (reference name and default in brackets):
        ratio: fraction of the patches recomputed on a RAS call, in (0, 1] [``sample_ratio``
            0.5]; ``int((1 - ratio) N)`` patches are cached.
        starvation: the score is multiplied by ``exp(starvation * drop count)``
            [``starvation_scale`` 0.1].
        warmup: RAS starts at this step; the earlier ones run in full
            [``scheduler_start_step`` 4].
        dense: steps that run in full between RAS steps, ``/``-separated or ``none``
            [``error_reset_steps`` "12,22"].
        ref_steps: the step count that ``warmup`` and ``dense`` refer to; they are scaled to
            the run's model calls [``num_inference_steps`` 30]. Set it to the run's own call
            count to give the indices unscaled.
        high_ratio: share of the cached patches taken from the top of the ranking, the rest
            from the bottom, in [0, 1] [``high_ratio`` 1].
        metric: ``std`` or ``l2norm`` over the channels of each pixel [``metric`` std]; the
            std needs at least two channels.
        select: ``code`` (the reference: ``high_ratio`` decides) or ``paper_text``
            (recompute the highest-scoring patches, cache the lowest).
        full_every: flowdit's addition, a full call whenever this many calls have passed
            since the last one (0 = never; the reference has none).
        cfg: ``"batched"`` or ``"split"``.

    While active, the policy installs ``KVCacheProcessor`` on every attention layer and
    restores the previous processors afterwards, so custom processors (editing, sparse
    attention) do not run under RAS.
    """

    name = "ras"
    requires = frozenset({"token_layout", "attention_processors"})

    def __init__(self, ratio: float = 0.5, starvation: float = 0.1, warmup: int = 4, dense: str = "12/22",
                 ref_steps: int = 30, high_ratio: float = 1.0, metric: str = "std", select: str = "code",
                 full_every: int = 0, cfg: str = "batched"):
        super().__init__(cfg)
        self.ratio = _in_range(self.name, "ratio", ratio, 1e-9, 1.0)
        self.starvation = _in_range(self.name, "starvation", starvation, 0.0, float("inf"))
        self.warmup = _positive_int(self.name, "warmup", warmup, 0)
        self._dense = parse_steps(self.name, "dense", dense)
        self.dense = "/".join(map(str, self._dense)) or "none"
        self.ref_steps = _positive_int(self.name, "ref_steps", ref_steps)
        self.high_ratio = _in_range(self.name, "high_ratio", high_ratio, 0.0, 1.0)
        if metric not in METRICS:
            raise ConfigError(f"{self.name}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.metric = metric
        if select not in SELECTS:
            raise ConfigError(f"{self.name}: select must be one of {', '.join(SELECTS)}, got {select!r}")
        if select == "paper_text" and self.high_ratio != 1.0:
            raise ConfigError(f"{self.name}: high_ratio applies to select=code; select=paper_text caches "
                              f"the lowest-scoring patches, got high_ratio={self.high_ratio:g}")
        self.select = select
        self.full_every = _positive_int(self.name, "full_every", full_every, 0)
        self._clear()

    def _clear(self) -> None:
        self._current: dict | None = None
        self._patch: int | None = None
        self._drop: torch.Tensor | None = None
        self._next: tuple[int, torch.Tensor] | None = None
        self._last_full = 0

    def reset(self) -> None:
        """Forget every cached tensor, the pending selection and the drop counts."""
        super().reset()
        self._clear()

    # -- schedule ----------------------------------------------------------------------

    def _at(self, i: int, n: int | None) -> int:
        """Reference step ``i`` (of ``ref_steps``) as a call index of a run of ``n`` calls."""
        return i if n is None else int(math.floor(i * n / self.ref_steps + 0.5))

    def is_ras_call(self, k: int, n: int | None) -> bool:
        """Whether call ``k`` of ``n`` (``None``: unknown) updates only the selected tokens."""
        if k < max(1, self._at(self.warmup, n)) or (n is not None and k >= n):
            return False
        if k in {self._at(d, n) for d in self._dense}:
            return False
        return not (self.full_every and k - self._last_full >= self.full_every)

    # -- selection ---------------------------------------------------------------------

    def _check_channels(self, c: int) -> None:
        # The reference's torch.std over a single channel is NaN, so its ranking is undefined.
        if self.metric == "std" and c < 2 and self.ratio < 1.0:
            raise ConfigError(f"{self.name}: metric=std is the std over the channels of each pixel and needs "
                              f"at least 2 channels, the model has {c}; use metric=l2norm")

    def score(self, v: torch.Tensor, p: int, h: float) -> torch.Tensor:
        """Patch scores ``[B, N]`` before the starvation factor: the mean over each patch's
        ``p x p`` pixels of the std (or L2 norm) over channels of ``h v`` (``v [B, C, H, W]``),
        in float32, patches in the DiT token order."""
        B, C, H, W = v.shape
        self._check_channels(C)
        diff = (h * v.float()).permute(0, 2, 3, 1)
        per_pixel = diff.std(dim=-1) if self.metric == "std" else torch.norm(diff, p=2, dim=-1)
        per_patch = per_pixel.reshape(B, H // p, p, W // p, p).transpose(-2, -3).mean(-1).mean(-1)
        return per_patch.reshape(B, -1)

    def choose(self, v: torch.Tensor, p: int, h: float = 1.0, num_steps: int | None = None) -> torch.Tensor:
        """Select the patches to recompute on the next RAS call; update the drop counts.

        ``v [B, C, H, W]`` is the velocity of the current call, ``p`` the patch size, ``h`` the
        solver step, ``num_steps`` the run's call count (sets the drop counts' start).
        Returns the recomputed patch indices ``[B, M]``, ascending.
        """
        B, _, H, W = v.shape
        n = (H // p) * (W // p)
        if self._drop is None or tuple(self._drop.shape) != (B, n):
            start = (num_steps if num_steps is not None else self.ref_steps) + 1
            self._drop = torch.zeros(B, n, device=v.device) - start
        skip = int((1 - self.ratio) * (H // p) * (W // p))
        if skip == 0:
            return torch.arange(n, device=v.device).expand(B, n)
        m = self.score(v, p, h) * torch.exp(self.starvation * self._drop)
        order = torch.sort(m, dim=1, descending=False).indices
        high_ratio = 0.0 if self.select == "paper_text" else self.high_ratio
        low, high = int(skip * (1 - high_ratio)), int(skip * high_ratio)
        cached = torch.cat([order[:, :low], order[:, n - high:]], dim=1)
        self._drop.scatter_add_(1, cached, torch.ones_like(cached, dtype=self._drop.dtype))
        return order[:, low:n - high].sort(dim=1).values

    def after_velocity(self, v: torch.Tensor, ctx) -> None:
        """Called by the sampling loop with the velocity the solver uses (``[B, C, H, W]``,
        guidance applied): selects the next call's patches when it is a RAS call."""
        self._next = None
        k, n = step_of(ctx), getattr(ctx, "num_steps", None)
        if self._patch is None or v.ndim != 4 or not self.is_ras_call(k + 1, n):
            return
        t0, t1 = getattr(ctx, "t_step", None), getattr(ctx, "t_next", None)
        h = 1.0 if t0 is None or t1 is None else t1 - t0  # a common factor: it leaves the ranking as is
        self._next = (k + 1, self.choose(v, self._patch, h, n))

    # -- the call ----------------------------------------------------------------------

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        s = step_of(ctx)
        R, N, D = tokens.shape
        depth = len(model.blocks)
        n = getattr(ctx, "num_steps", None)
        if self._patch is None and (n is None or any(self.is_ras_call(k, n) for k in range(n))):
            self._check_channels(model.out_channels)  # fail on the first call, not after the warm-up
        self._patch = model.patch_size
        self._current = st
        store = st.setdefault("kv", {})
        idx = None
        if self._next is not None and self._next[0] == s and "v" in st and len(store) == depth:
            sel = self._next[1]
            if sel.shape[0] == R:
                idx = sel
            elif 2 * sel.shape[0] == R:  # batched CFG: rows [cond; uncond] share the image's patches
                idx = torch.cat([sel, sel])
        x = tokens if idx is None else tokens.gather(1, idx[..., None].expand(-1, -1, D))
        saved = [blk.attn.processor for blk in model.blocks]
        try:
            for i, blk in enumerate(model.blocks):
                blk.attn.processor = KVCacheProcessor(store, i, idx)
            for blk in model.blocks:
                x = blk(x, c_act, ctx)
        finally:
            for blk, proc in zip(model.blocks, saved):
                blk.attn.processor = proc
        m = x.shape[1]
        self.stats.block_evals += m / N
        self.stats.flops += depth * R * block_flops(model, m, N)
        st["idx"] = idx
        if idx is None:
            self._last_full = s
            self.stats.full_calls += 1
            st["tokens"] = x
            return x
        out = st["tokens"].scatter(1, idx[..., None].expand(-1, -1, D), x)
        st["tokens"] = out
        return out

    def after_output(self, model, v: torch.Tensor, ctx) -> torch.Tensor:
        """Keep the last velocity of the patches not recomputed in this call.

        ``v [R, C, H, W]`` is the model output; returns it with the cached patches replaced
        by their previous values, and stores the result for the next call.
        """
        st = self._current
        if st is None:
            return v
        idx = st.get("idx")
        if idx is not None:
            p = model.patch_size
            prev = patchify(st["v"], p)
            new = patchify(v, p)
            merged = prev.scatter(1, idx[..., None].expand(-1, -1, prev.shape[-1]),
                                  new.gather(1, idx[..., None].expand(-1, -1, new.shape[-1])))
            v = model.unpatchify(merged).to(v.dtype)
        st["v"] = v
        self._current = None
        return v
