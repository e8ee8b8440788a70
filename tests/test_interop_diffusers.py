"""diffusers' SD3 and FLUX transformers under flowdit's solvers, guidance and caches.

Tiny random-weight models built from their constructors (nothing is downloaded). The
references are diffusers' own pipelines run on ``prompt_embeds`` with
``output_type="latent"``: their loop (``FlowMatchEulerDiscreteScheduler.step`` on the
scheduler's sigmas, CFG as ``uncond + scale (cond - uncond)``) is what the bridge must equal.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from flowdit.accel import build_policy  # noqa: E402
from flowdit.edit.inversion import invert, regenerate  # noqa: E402
from flowdit.errors import ConfigError  # noqa: E402
from flowdit.interop.diffusers import (  # noqa: E402
    DiffusersBridge,
    pack_flux_latents,
    scheduler_grid,
    text_condition,
    unpack_flux_latents,
    wrap_transformer,
)
from flowdit.sampling.context import StepContext  # noqa: E402
from flowdit.sampling.guidance import cfg_velocity  # noqa: E402
from flowdit.sampling.sample import sample  # noqa: E402


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                                 pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16).eval()


def tiny_flux(guidance_embeds: bool = False) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                  pooled_projection_dim=32, axes_dims_rope=(2, 2, 4),
                                  guidance_embeds=guidance_embeds).eval()


def sd3_pipeline(transformer=None):
    return StableDiffusion3Pipeline(transformer=transformer or tiny_sd3(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def flux_pipeline(transformer=None):
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                          base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer or tiny_flux(), scheduler=sch, vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None)


def prompts(text_len: int, text_dim: int, pooled_dim: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cond = text_condition(torch.randn(2, text_len, text_dim, generator=g), torch.randn(2, pooled_dim, generator=g))
    neg = text_condition(torch.randn(2, text_len, text_dim, generator=g), torch.randn(2, pooled_dim, generator=g))
    return cond, neg


def flowdit_euler(model, grid, noise, cond, neg, cfg, ctx=None):
    if cfg == 1.0:
        def fn(x, t):
            return model(x, t, cond, ctx=ctx)
    else:
        fn = cfg_velocity(model, cond, neg, cfg, ctx=ctx)
    return sample(fn, noise, solver="euler", schedule=grid, step_context=ctx).x


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_sd3_euler_with_the_bridge_equals_the_diffusers_pipeline(cfg):
    pipe = sd3_pipeline()
    cond, neg = prompts(7, 64, 64)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    ref = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
               negative_prompt_embeds=neg["encoder_hidden_states"],
               negative_pooled_prompt_embeds=neg["pooled_projections"], latents=noise.clone(),
               num_inference_steps=6, guidance_scale=cfg, output_type="latent",
               height=16 * pipe.vae_scale_factor, width=16 * pipe.vae_scale_factor).images
    grid = scheduler_grid(pipe.scheduler, 6)
    ours = flowdit_euler(wrap_transformer(pipe.transformer), grid, noise.clone(), cond, neg, cfg)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance_embeds", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_flux_euler_with_the_bridge_equals_the_diffusers_pipeline(guidance_embeds, cfg):
    pipe = flux_pipeline(tiny_flux(guidance_embeds))
    cond, neg = prompts(5, 64, 32)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    vsf = pipe.vae_scale_factor
    ref = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
               negative_prompt_embeds=neg["encoder_hidden_states"],
               negative_pooled_prompt_embeds=neg["pooled_projections"], latents=pack_flux_latents(noise),
               num_inference_steps=6, true_cfg_scale=cfg, guidance_scale=3.5, output_type="latent",
               height=8 * vsf, width=8 * vsf).images
    grid = scheduler_grid(pipe.scheduler, 6, image_seq_len=16)
    model = wrap_transformer(pipe.transformer, guidance=3.5 if guidance_embeds else None)
    ours = flowdit_euler(model, grid, noise.clone(), cond, neg, cfg)
    torch.testing.assert_close(pack_flux_latents(ours), ref, rtol=1e-5, atol=1e-5)


def test_flux_packing_round_trips_and_matches_the_pipeline():
    x = torch.randn(2, 4, 8, 6)
    packed = pack_flux_latents(x)
    assert packed.shape == (2, 12, 16)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_flux_latents(packed, 8, 6), x)
    with pytest.raises(ConfigError, match="even"):
        pack_flux_latents(torch.randn(1, 4, 7, 8))


def test_scheduler_grids_are_the_pipelines_shifted_sigmas():
    sd3 = scheduler_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 10)
    # SD3: the scheduler's smallest training sigma is already shifted, 3 u / (1 + 2 u) at
    # u = 1/1000; the grid spaces s from 1 to it and shifts again: sigma = 3 s / (1 + 2 s).
    s_min = 3e-3 / (1 + 2e-3)
    s = torch.linspace(1.0, s_min, 10, dtype=torch.float64)
    torch.testing.assert_close(sd3[:-1], 3 * s / (1 + 2 * s), rtol=1e-5, atol=1e-6)
    assert sd3[-1] == 0 and sd3[0] == 1
    flux = scheduler_grid(flux_pipeline().scheduler, 10, image_seq_len=4096)
    # FLUX at 4096 tokens: mu = max_shift = 1.15, sigma = e^mu / (e^mu + 1/s - 1), s = linspace(1, 1/N).
    s = torch.linspace(1.0, 0.1, 10, dtype=torch.float64)
    e = torch.exp(torch.tensor(1.15, dtype=torch.float64))
    torch.testing.assert_close(flux[:-1], e / (e + 1 / s - 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="image_seq_len"):
        scheduler_grid(flux_pipeline().scheduler, 10)


FULL_COMPUTE = ["none", "fora:interval=1,cache=stack", "taylorseer:interval=1,order=2,cache=stack",
                "taylorseer:interval=1,order=1,cache=stack,spaced=1", "gated_taylor:threshold=0",
                "fbcache:threshold=0", "teacache:threshold=0", "delta_dit:interval=1,blocks=1"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("spec", FULL_COMPUTE)
def test_every_cache_at_full_compute_reproduces_the_uncached_bridge(family, spec):
    if family == "sd3":
        model, noise, (cond, neg), seq = wrap_transformer(tiny_sd3()), torch.randn(2, 4, 16, 16), prompts(7, 64, 64), None
        grid = scheduler_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 5)
    else:
        model, noise, (cond, neg) = wrap_transformer(tiny_flux()), torch.randn(2, 4, 8, 8), prompts(5, 64, 32)
        grid = scheduler_grid(flux_pipeline().scheduler, 5, image_seq_len=16)
    ref = flowdit_euler(model, grid, noise, cond, neg, 3.0)
    policy = build_policy(spec)
    out = flowdit_euler(model, grid, noise, cond, neg, 3.0, ctx=StepContext(block_policy=policy))
    assert torch.equal(out, ref)
    assert policy.stats.full_calls == policy.stats.calls == 5


def test_a_skipping_cache_runs_fewer_blocks_and_stays_close():
    model = wrap_transformer(tiny_flux())
    noise, (cond, neg) = torch.randn(2, 4, 8, 8), prompts(5, 64, 32)
    grid = scheduler_grid(flux_pipeline().scheduler, 8, image_seq_len=16)
    ref = flowdit_euler(model, grid, noise, cond, neg, 1.0)
    policy = build_policy("fora:interval=2,cache=stack")
    out = flowdit_euler(model, grid, noise, cond, neg, 1.0, ctx=StepContext(block_policy=policy))
    # FORA's count-down schedule over 8 calls: the first, then reverse indices 6, 4, 2, 0.
    assert policy.stats.full_calls == 5 and policy.stats.calls == 8
    assert 0 < (out - ref).abs().max() < 0.5 * ref.abs().max()


@pytest.mark.parametrize("spec", ["fora", "taylorseer", "ras", "tome:ratio=0.3"])
def test_policies_that_need_dit_internals_are_refused_by_name(spec):
    """Per-block FORA and TaylorSeer run (the adapter offers ``block_branches``); the
    token-level policies, which need a square patch grid and flowdit's attention
    processors, are refused in one line that names them."""
    model = wrap_transformer(tiny_sd3())
    cond, _ = prompts(7, 64, 64)
    ctx = StepContext(block_policy=build_policy(spec))
    ctx.begin(4, 4)
    if spec in ("fora", "taylorseer"):
        assert model(torch.randn(2, 4, 16, 16), 0.5, cond, ctx=ctx).shape == (2, 4, 16, 16)
        return
    with pytest.raises(ConfigError, match=r"--accel .* SD3Transformer does not offer"):
        model(torch.randn(2, 4, 16, 16), 0.5, cond, ctx=ctx)


@pytest.mark.parametrize("solver, lo, hi", [("euler", 0.85, 1.15), ("rf2", 1.5, 3.5), ("heun", 1.8, 3.5)])
def test_inversion_round_trip_shrinks_at_the_solvers_order(solver, lo, hi):
    """Invert then regenerate on the pipeline-like grid (shift 3): the error falls as
    ``h^p`` for a solver of order ``p`` (fitted over 8, 16, 32 steps; a random
    transformer's field is rougher than a trained one's, so the bounds are loose)."""
    model = wrap_transformer(tiny_sd3())
    cond, _ = prompts(7, 64, 64)
    x0 = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.5

    def fn(x, t):
        return model(x, t, cond)

    errs = []
    for n in (8, 16, 32):
        z = invert(fn, x0, solver=solver, steps=n, shift=3.0).x
        errs.append((regenerate(fn, z, solver=solver, steps=n, shift=3.0).x - x0).abs().max().item())
    order = math.log2(errs[0] / errs[-1]) / 2
    assert lo < order < hi, (order, errs)


def test_flux_guidance_option_follows_the_model():
    with pytest.raises(ConfigError, match="no guidance embedding"):
        wrap_transformer(tiny_flux(False), guidance=3.5)
    assert wrap_transformer(tiny_flux(True)).guidance == 3.5
    with pytest.raises(ConfigError, match="SD3 has no guidance embedding"):
        wrap_transformer(tiny_sd3(), guidance=3.5)
    with pytest.raises(ConfigError, match="no flowdit adapter"):
        wrap_transformer(torch.nn.Linear(2, 2))


def test_bridge_loads_a_saved_pipeline_offline_and_samples_like_it(tmp_path):
    pipe = sd3_pipeline()
    pipe.save_pretrained(tmp_path / "sd3")
    bridge = DiffusersBridge.from_pretrained(str(tmp_path / "sd3"))
    assert bridge.model.family == "sd3" and bridge.latent_channels == 4
    cond, neg = prompts(7, 64, 64)
    noise = torch.randn(2, 4, 16, 16)
    ref = pipe(prompt_embeds=cond["encoder_hidden_states"], pooled_prompt_embeds=cond["pooled_projections"],
               negative_prompt_embeds=neg["encoder_hidden_states"],
               negative_pooled_prompt_embeds=neg["pooled_projections"], latents=noise.clone(),
               num_inference_steps=5, guidance_scale=2.0, output_type="latent", height=128, width=128).images
    out = bridge.sample(noise.clone(), cond, neg, cfg=2.0, solver="euler", steps=5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # A cache through the bridge at full compute changes nothing.
    same = bridge.sample(noise.clone(), cond, neg, cfg=2.0, steps=5, accel="fbcache:threshold=0")
    assert torch.equal(same, out)


def test_bridge_refuses_a_policy_the_model_cannot_run_before_sampling():
    bridge = DiffusersBridge(sd3_pipeline())
    cond, _ = prompts(7, 64, 64)
    calls = []
    bridge.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match="--accel ras"):
        bridge.sample(torch.randn(2, 4, 16, 16), cond, steps=4, accel="ras")
    assert calls == []


def test_bridge_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        DiffusersBridge.from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text(json.dumps({}))
    with pytest.raises(ConfigError, match="model_index.json"):
        DiffusersBridge.from_pretrained(str(tmp_path / "x"))


# ---------------------------------------------------------------- RF-Edit on SD3 / FLUX


def _edit_case(family):
    if family == "flux":
        bridge = DiffusersBridge(flux_pipeline())
        cond, neg = prompts(5, 64, 32)
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    else:
        bridge = DiffusersBridge(sd3_pipeline())
        cond, neg = prompts(7, 64, 64)
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    return bridge, cond, neg, latents


def test_rf_edit_default_blocks_are_the_references_late_single_stream_blocks():
    model = wrap_transformer(tiny_flux())
    assert len(model.attention_modules()) == 3 and model.rf_edit_blocks() == [2]  # 1 joint + singles 1..1
    assert wrap_transformer(FluxTransformer2DModel(
        num_layers=19, num_single_layers=38, attention_head_dim=8, num_attention_heads=1,
        joint_attention_dim=8, pooled_projection_dim=8, in_channels=4, axes_dims_rope=(2, 2, 4)),
    ).rf_edit_blocks() == list(range(19 + 20, 19 + 38))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rf_edit_without_injection_is_inversion_and_regeneration_on_the_bridge(family):
    bridge, cond, neg, latents = _edit_case(family)
    res = bridge.edit(latents, cond, neg, inject_steps=0, solver="rf2", steps=4)
    grid = bridge.grid(4, latents.shape[-2], latents.shape[-1])

    def fn(y):
        return lambda x, t: bridge.model(x, t, y)

    z = sample(fn(cond), latents, "rf2", schedule=grid.flip(0)).x
    out = sample(fn(neg), z, "rf2", schedule=grid).x
    torch.testing.assert_close(res.noise, z, rtol=0, atol=0)
    torch.testing.assert_close(res.images, out, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rf_edit_shares_the_recorded_values_on_the_bridge(family):
    bridge, cond, neg, latents = _edit_case(family)
    plain = bridge.edit(latents, cond, neg, inject_steps=0, solver="rf2", steps=4)
    edited = bridge.edit(latents, cond, neg, inject_steps=2, solver="rf2", steps=4)
    assert (edited.images - plain.images).abs().max() > 1e-4  # the injected values act
    torch.testing.assert_close(edited.noise, plain.noise, rtol=0, atol=0)  # inversion only records
    # Reinjecting the values of the very pass that recorded them changes nothing.
    from flowdit.edit import value_sharing

    sharing = value_sharing(bridge.model)
    ctx = StepContext(hooks=[sharing])
    grid = bridge.grid(4, latents.shape[-2], latents.shape[-1])
    sharing.plan = lambda i: "record"
    rec = sample(lambda x, t: bridge.model(x, t, cond, ctx=ctx), latents, "rf2", schedule=grid, step_context=ctx).x
    assert len(sharing.store) == 4 * 2 * len(sharing.blocks)  # steps x evaluations x layers
    sharing.plan = lambda i: "inject"
    inj = sample(lambda x, t: bridge.model(x, t, cond, ctx=ctx), latents, "rf2", schedule=grid, step_context=ctx).x
    torch.testing.assert_close(inj, rec, rtol=0, atol=0)


def test_rf_edit_under_a_full_compute_cache_on_the_bridge_is_rf_edit():
    bridge, cond, neg, latents = _edit_case("flux")
    alone = bridge.edit(latents, cond, neg, inject_steps=2, solver="rf2", steps=4, cfg=2.0, negative=neg)
    cached = bridge.edit(latents, cond, neg, inject_steps=2, solver="rf2", steps=4, cfg=2.0, negative=neg,
                         accel="fora:interval=1,cache=stack")
    torch.testing.assert_close(cached.images, alone.images, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="negative"):
        bridge.edit(latents, cond, neg, cfg=2.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rf_inversion_with_text_conditions_on_the_bridge(family):
    from flowdit.edit.rf_inversion import controlled_forward_field, controlled_reverse_field

    bridge, cond, neg, latents = _edit_case(family)
    # gamma = eta = 0 is plain inversion and regeneration on the pipeline's grid.
    plain = bridge.rf_inversion(latents, cond, neg, gamma=0.0, eta=0.0, solver="euler", steps=4)
    grid = bridge.grid(4, latents.shape[-2], latents.shape[-1])
    z = sample(lambda x, t: bridge.model(x, t, cond), latents, "euler", schedule=grid.flip(0)).x
    torch.testing.assert_close(plain.noise, z, rtol=0, atol=0)
    torch.testing.assert_close(plain.images, sample(lambda x, t: bridge.model(x, t, neg), z, "euler",
                                                    schedule=grid).x, rtol=0, atol=0)
    # gamma = 1 steers the forward pass onto the straight line to its noise sample y1.
    y1 = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    steered = bridge.rf_inversion(latents, cond, neg, gamma=1.0, eta=0.9, eta_steps=(0, 2), steps=4, seed=0)
    fwd = controlled_forward_field(lambda x, t: bridge.model(x, t, cond), y1, 1.0)
    torch.testing.assert_close(steered.noise, sample(fwd, latents, "euler", schedule=grid.flip(0)).x,
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(steered.noise, y1, rtol=1e-4, atol=1e-4)
    rev = controlled_reverse_field(lambda x, t: bridge.model(x, t, neg), latents, 0.9,
                                   (float(grid[2]), float(grid[0])))
    torch.testing.assert_close(steered.images, sample(rev, steered.noise, "euler", schedule=grid).x,
                               rtol=1e-6, atol=1e-6)


def test_flowdit_shifts_are_sd3_and_flux_shifts():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from flowdit.core import dynamic_shift, resolution_shift, shift_time

    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    for seq in (64, 256, 1024, 4096):
        mu = calculate_shift(seq)
        torch.testing.assert_close(shift_time(t, dynamic_shift(seq)), sch._time_shift_exponential(mu, 1.0, t),
                                   rtol=1e-12, atol=1e-12)
    # SD3 trains 1024^2 with shift 3.0; its rule sqrt(m / n) maps 256^2 -> 1024^2 to 4.
    assert resolution_shift(4096, 256) == 4.0
    with pytest.raises(ConfigError, match="num_tokens"):
        dynamic_shift(0)
