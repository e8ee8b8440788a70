"""flowdit's FBCache and TaylorSeer (``cache=stack``) against diffusers' own cache hooks.

The references run diffusers' hooks (``diffusers.hooks.apply_first_block_cache``,
``apply_taylorseer_cache``) in a manual ``FlowMatchEulerDiscreteScheduler`` loop on the tiny
random transformers (the loop the pipelines run; ``SD3Transformer2DModel`` has no
``cache_context`` in diffusers 0.42, so the hooks' context is set by hand). flowdit runs the
same weights through its adapter with the corresponding policy. docs/interop.md
("Cross-checks with diffusers' cache hooks") states what each computes and why they agree
or differ; these tests assert exactly that.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.hooks import (  # noqa: E402
    FirstBlockCacheConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context  # noqa: E402
from diffusers.hooks.taylorseer_cache import TaylorSeerState  # noqa: E402

from flowdit.accel import build_policy  # noqa: E402
from flowdit.accel.first_block_cache import FirstBlockCache, rel_l1  # noqa: E402
from flowdit.accel.forecast import TaylorForecaster  # noqa: E402
from flowdit.interop.diffusers import (  # noqa: E402
    flux_image_ids,
    pack_flux_latents,
    scheduler_grid,
    text_condition,
    unpack_flux_latents,
    wrap_transformer,
)
from flowdit.sampling.context import StepContext  # noqa: E402
from flowdit.sampling.guidance import cfg_velocity  # noqa: E402
from flowdit.sampling.sample import sample  # noqa: E402

STEPS = 8


def tiny(family: str):
    """The same tiny random transformer on every call (seeded)."""
    torch.manual_seed(0)
    if family == "sd3":
        return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                     num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                     pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16).eval()
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                  pooled_projection_dim=32, axes_dims_rope=(2, 2, 4)).eval()


def flux_scheduler():
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def setting(family: str):
    """(noise, cond, neg, cfg): SD3 with batched CFG 3 as its pipeline, FLUX without CFG."""
    g = torch.Generator().manual_seed(1)
    length, dim, pooled = (7, 64, 64) if family == "sd3" else (5, 64, 32)
    cond = text_condition(torch.randn(2, length, dim, generator=g), torch.randn(2, pooled, generator=g))
    neg = text_condition(torch.randn(2, length, dim, generator=g), torch.randn(2, pooled, generator=g))
    side = 16 if family == "sd3" else 8
    noise = torch.randn(2, 4, side, side, generator=g)
    return noise, cond, neg, (3.0 if family == "sd3" else 1.0)


@contextlib.contextmanager
def cache_context(transformer, name: str):
    """``transformer.cache_context(name)`` for models without ``CacheMixin`` (SD3 in 0.42)."""
    _set_cache_context(transformer, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)


def diffusers_loop(tr, family, noise, cond, neg, cfg, on_step=None):
    """The pipelines' denoising loop: scheduler timesteps, one (CFG-batched) call per step,
    ``scheduler.step``; SD3 is fed ``timestep = 1000 sigma``, FLUX ``sigma`` and packed latents."""
    if family == "sd3":
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sch.set_timesteps(STEPS)
        x = noise.clone()
    else:
        sch = flux_scheduler()
        scheduler_grid(sch, STEPS, image_seq_len=(noise.shape[-2] // 2) * (noise.shape[-1] // 2))
        x = pack_flux_latents(noise)
    for i, t in enumerate(sch.timesteps):
        if on_step is not None:
            on_step(i)
        with cache_context(tr, "cond"):
            if family == "sd3":
                batched = cfg != 1.0
                xin = torch.cat([x, x]) if batched else x
                emb = torch.cat([neg["encoder_hidden_states"], cond["encoder_hidden_states"]]) if batched \
                    else cond["encoder_hidden_states"]
                pooled = torch.cat([neg["pooled_projections"], cond["pooled_projections"]]) if batched \
                    else cond["pooled_projections"]
                v = tr(hidden_states=xin, timestep=t.expand(xin.shape[0]), encoder_hidden_states=emb,
                       pooled_projections=pooled, return_dict=False)[0]
                if batched:
                    u, c = v.chunk(2)
                    v = u + cfg * (c - u)
            else:
                txt = cond["encoder_hidden_states"]
                v = tr(hidden_states=x, timestep=(t / 1000).expand(x.shape[0]), encoder_hidden_states=txt,
                       pooled_projections=cond["pooled_projections"], txt_ids=torch.zeros(txt.shape[1], 3),
                       img_ids=flux_image_ids(noise.shape[-2] // 2, noise.shape[-1] // 2), return_dict=False)[0]
        x = sch.step(v, t, x, return_dict=False)[0]
    return x if family == "sd3" else unpack_flux_latents(x, noise.shape[-2], noise.shape[-1])


def flowdit_run(tr, family, noise, cond, neg, cfg, policy=None, ctx=None):
    """flowdit's Euler on the pipeline's grid through the adapter, with ``policy``."""
    model = wrap_transformer(tr)
    seq = (noise.shape[-2] // 2) * (noise.shape[-1] // 2)
    grid = scheduler_grid(FlowMatchEulerDiscreteScheduler(shift=3.0) if family == "sd3" else flux_scheduler(),
                          STEPS, image_seq_len=seq)
    ctx = StepContext(block_policy=policy) if ctx is None else ctx
    if cfg == 1.0:
        def fn(x, t):
            ctx.branch = "cond"
            return model(x, t, cond, ctx=ctx)
    else:
        fn = cfg_velocity(model, cond, neg, cfg, ctx=ctx)
    return sample(fn, noise.clone(), solver="euler", schedule=grid, step_context=ctx).x, ctx


def last_block(tr):
    return (tr.single_transformer_blocks if hasattr(tr, "single_transformer_blocks") else tr.transformer_blocks)[-1]


def record_full_steps(tr, step_of):
    """Steps at which the stack's last block really computes its attention (its query projection runs)."""
    steps: list[int] = []
    last_block(tr).attn.to_q.register_forward_hook(lambda *a: steps.append(step_of()))
    return steps


# -- First-block cache ---------------------------------------------------------------------------


class ImageStreamFBCache(FirstBlockCache):
    """flowdit's FBCache with diffusers' decision rule, for the cross-check only: the signal is
    the first block's residual on the *image* stream, and the rest is reused when the change
    is ``<= threshold`` (diffusers computes when ``diff > threshold``). The reuse is flowdit's
    (``h_1 + rest`` on both streams, the reference refreshed on full calls only)."""

    def __init__(self, threshold: float):
        super().__init__(threshold=threshold)
        self.changes: list[float] = []

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        n = model._call.n_txt
        h1 = self.run_blocks(model, tokens, c_act, ctx, 0, 1)
        r1 = (h1 - tokens)[:, n:]
        if st.get("r1") is not None:
            change = rel_l1(r1, st["r1"])
            self.changes.append(change)
            if change <= self.threshold:
                return h1 + st["rest"]
        out = self.run_blocks(model, h1, c_act, ctx, 1, None)
        st["r1"], st["rest"] = r1, out - h1
        self.stats.full_calls += 1
        return out


class RecordingFBCache(FirstBlockCache):
    """flowdit's own FBCache, recording its signal (``last_change``) at every call that has one."""

    def __init__(self, threshold: float):
        super().__init__(threshold=threshold)
        self.changes: list[float] = []

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        out = super().decide_and_run(model, tokens, c_act, ctx, st)
        if "last_change" in st:
            self.changes.append(st.pop("last_change"))
        return out


def diffusers_fbcache(threshold: float, family: str = "flux"):
    """A FLUX transformer with diffusers' FBCache; records its signal per call after the first."""
    tr = tiny(family)
    apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=threshold))
    head = tr.transformer_blocks[0]._diffusers_hook.get_hook("fbc_leader_block_hook")
    signals: list[float] = []
    decide = head._should_compute_remaining_blocks

    def recording(residual):
        ref = head.state_manager.get_state().head_block_residual
        if ref is not None:
            signals.append(((residual - ref).abs().mean() / ref.abs().mean()).item())
        return decide(residual)

    head._should_compute_remaining_blocks = recording
    return tr, signals


def run_diffusers(tr, family="flux"):
    noise, cond, neg, cfg = setting(family)
    step = [0]
    full = record_full_steps(tr, lambda: step[0])
    with torch.no_grad():
        out = diffusers_loop(tr, family, noise, cond, neg, cfg, on_step=lambda i: step.__setitem__(0, i))
    return out, full


def run_flowdit(policy, family="flux"):
    noise, cond, neg, cfg = setting(family)
    tr = tiny(family)
    holder = {}
    full = record_full_steps(tr, lambda: holder["ctx"].step)
    model_ctx = StepContext(block_policy=policy)
    holder["ctx"] = model_ctx
    out, _ = flowdit_run(tr, family, noise, cond, neg, cfg, ctx=model_ctx)
    return out, full


@pytest.fixture(scope="module")
def uncached():
    """diffusers' uncached loop on both tiny models, and flowdit's uncached adapter run."""
    res = {}
    with torch.no_grad():
        for family in ("sd3", "flux"):
            noise, cond, neg, cfg = setting(family)
            res[family] = diffusers_loop(tiny(family), family, noise, cond, neg, cfg)
            ours = flowdit_run(tiny(family), family, noise, cond, neg, cfg)[0]
            torch.testing.assert_close(ours, res[family], rtol=1e-5, atol=1e-5)
    return res


def test_diffusers_fbcache_cannot_run_sd3_whose_last_block_has_no_text_output():
    """SD3's last joint block is ``context_pre_only`` and returns ``encoder_hidden_states =
    None``; diffusers' tail hook subtracts the head block's text output from it. flowdit's
    adapter passes the text tokens through that block, so its FBCache runs on SD3."""
    tr = tiny("sd3")
    apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=0.0))
    noise, cond, neg, cfg = setting("sd3")
    with torch.no_grad(), pytest.raises(TypeError, match="NoneType"):
        diffusers_loop(tr, "sd3", noise, cond, neg, cfg)
    out, _ = run_flowdit(build_policy("fbcache:threshold=0.5"), "sd3")
    assert torch.isfinite(out).all()


def test_fbcache_at_full_compute_both_equal_the_uncached_run(uncached):
    ref = uncached["flux"]
    out, full = run_diffusers(diffusers_fbcache(0.0)[0])
    assert torch.equal(out, ref) and full == list(range(STEPS))
    policy = build_policy("fbcache:threshold=0")
    ours, ours_full = run_flowdit(policy)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours_full == list(range(STEPS)) and policy.stats.full_calls == STEPS


def test_fbcache_signals_differ_by_design_but_agree_with_the_image_stream_rule():
    """All calls in full (threshold 0): both keep the last full call's residual as reference,
    so the signals are computed against the same calls. diffusers' signal (image stream) is
    reproduced by the image-stream variant to float tolerance; flowdit's own signal (the
    joined text + image residual) is a different number."""
    tr, signals = diffusers_fbcache(0.0)
    run_diffusers(tr)
    variant = ImageStreamFBCache(0.0)
    run_flowdit(variant)
    assert len(signals) == len(variant.changes) == STEPS - 1
    torch.testing.assert_close(torch.tensor(variant.changes), torch.tensor(signals), rtol=1e-5, atol=1e-6)

    own = RecordingFBCache(threshold=0.0)
    run_flowdit(own)
    assert len(own.changes) == STEPS - 1
    gap = max(abs(a - b) for a, b in zip(own.changes, signals))
    assert gap > 1e-3, (own.changes, signals)


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_fbcache_with_the_image_stream_rule_makes_diffusers_decisions_and_latents(threshold):
    """The reuse rules coincide: with diffusers' signal and comparison, flowdit's stack-level
    FBCache skips at the same calls and ends at the same latent (float tolerance)."""
    tr, _ = diffusers_fbcache(threshold)
    ref, ref_full = run_diffusers(tr)
    variant = ImageStreamFBCache(threshold)
    ours, ours_full = run_flowdit(variant)
    assert ours_full == ref_full and len(ref_full) < STEPS
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold, agree", [(0.286, False), (0.32, False), (0.35, True), (0.5, True)])
def test_fbcache_own_policy_decides_as_diffusers_until_the_two_signals_straddle_the_threshold(
        uncached, threshold, agree):
    """flowdit's own FBCache (joined-stream signal, ``<``) against diffusers' (image-stream
    signal, ``<=``) at the same threshold: while the decisions agree both hold the same
    reference call, so the first call where they part is one where the two signals lie on
    either side of the threshold. Where they never do, the latents agree to float tolerance.
    The thresholds are above the realistic 0.05-0.1 because a random model's first-block
    residual changes by 0.2-0.35 between Euler calls here (nothing would be skipped)."""
    tr, theirs = diffusers_fbcache(threshold)
    ref, ref_full = run_diffusers(tr)
    own = RecordingFBCache(threshold=threshold)
    ours, ours_full = run_flowdit(own)
    assert len(theirs) == len(own.changes) == STEPS - 1
    d = [s in ref_full for s in range(STEPS)]
    o = [s in ours_full for s in range(STEPS)]
    assert (d == o) == agree, (ref_full, ours_full, theirs, own.changes)
    if agree:
        assert len(ref_full) < STEPS
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        assert (ref - uncached["flux"]).abs().max() > 1e-3
    else:
        k = next(i for i in range(STEPS) if d[i] != o[i])
        a, b = theirs[k - 1], own.changes[k - 1]
        assert min(a, b) <= threshold <= max(a, b), (k, a, b)


# -- TaylorSeer ------------------------------------------------------------------------------------


def diffusers_full_steps(before: int, interval: int, n: int) -> list[int]:
    """``TaylorSeerCacheHook._measure_should_compute``: calls ``s < before`` and those with
    ``(s - before - 1) % interval == 0``."""
    return [s for s in range(n) if s < before or (s - before - 1) % interval == 0]


def flowdit_full_steps(warmup: int, interval: int, n: int) -> list[int]:
    """flowdit's TaylorSeer: calls ``s < warmup``, then one every ``interval`` after the last full."""
    full = []
    for s in range(n):
        if s < warmup or s - full[-1] >= interval:
            full.append(s)
    return full


def diffusers_taylorseer(family, before, interval, order):
    tr = tiny(family)
    apply_taylorseer_cache(tr, TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before,
                                                     max_order=order, taylor_factors_dtype=torch.float32))
    return tr


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_taylorseer_at_full_compute_both_equal_the_uncached_run(uncached, family):
    ref = uncached[family]
    out, full = run_diffusers(diffusers_taylorseer(family, 3, 1, 2), family)
    assert torch.equal(out, ref) and full == list(range(STEPS))
    ours, ours_full = run_flowdit(build_policy("taylorseer:interval=1,order=2,cache=stack"), family)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert ours_full == list(range(STEPS))


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("warmup, interval", [(2, 2), (2, 3), (3, 5)])
def test_taylorseer_schedules_follow_their_rules_and_coincide_at_interval_2(uncached, family, warmup, interval):
    """The full calls are each implementation's closed form; with ``warmup =
    disable_cache_before_step`` they coincide at interval 2 only (diffusers refreshes at
    ``before + 1``, one call after its warm-up, flowdit at ``warmup - 1 + interval``). The
    latents differ by design: diffusers forecasts every attention module's outputs and
    recomputes the rest of each block; flowdit's ``cache=stack`` forecasts the stack residual."""
    ref, full = run_diffusers(diffusers_taylorseer(family, warmup, interval, 1), family)
    spec = f"taylorseer:interval={interval},order=1,warmup={warmup},cache=stack"
    ours, ours_full = run_flowdit(build_policy(spec), family)
    assert full == diffusers_full_steps(warmup, interval, STEPS)
    assert ours_full == flowdit_full_steps(warmup, interval, STEPS)
    assert (full == ours_full) == (interval == 2)
    base = uncached[family]
    assert (ref - base).abs().max() > 1e-4 and (ours - base).abs().max() > 1e-4
    assert (ours - ref).abs().max() > 1e-4


@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylorseer_forecasts_agree_on_the_same_full_call_features(order):
    """Given the features of the same full calls, diffusers' ``TaylorSeerState`` (float32
    factors) and flowdit's ``TaylorForecaster`` hold the same divided differences and
    predict the same values: the Taylor formula is the same."""
    g = torch.Generator().manual_seed(0)
    state = TaylorSeerState(taylor_factors_dtype=torch.float32, max_order=order)
    ours = TaylorForecaster(order)
    full = [0, 1, 3, 5, 8]
    for s in range(10):
        state.current_step = s
        if s in full:
            f = torch.randn(2, 6, 4, generator=g) + s
            state.update((f,))
            ours.update(s, f)
        else:
            torch.testing.assert_close(ours.predict(s), state.predict()[0], rtol=1e-5, atol=1e-5)
    assert ours.points == len(state.taylor_factors[0]) == min(order, len(full) - 1) + 1
    assert math.isfinite(float(ours.predict(9).abs().max()))
