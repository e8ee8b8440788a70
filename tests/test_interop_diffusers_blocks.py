"""Per-block caches (FORA, TaylorSeer ``cache=blocks``) on diffusers' SD3 and FLUX blocks.

The adapter re-states each diffusers block with its branch outputs exposed before their
adaLN gates (``forward_branches``, ``gates``). These tests hold the re-statement to
diffusers' own block forward, the full-compute caches to the uncached bridge, and the
cached calls to a hand re-statement of what FORA and TaylorSeer add back.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from test_interop_diffusers import flowdit_euler, flux_pipeline, prompts, tiny_flux, tiny_sd3  # noqa: E402

from flowdit.accel import build_policy  # noqa: E402
from flowdit.errors import ConfigError  # noqa: E402
from flowdit.interop.diffusers import scheduler_grid, wrap_transformer  # noqa: E402
from flowdit.sampling.context import StepContext  # noqa: E402


def case(family: str, steps: int = 5):
    """A tiny model, noise, (cond, neg) and the pipeline's grid."""
    if family == "sd3":
        return (wrap_transformer(tiny_sd3()), torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)),
                prompts(7, 64, 64), scheduler_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), steps))
    return (wrap_transformer(tiny_flux()), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)),
            prompts(5, 64, 32), scheduler_grid(flux_pipeline().scheduler, steps, image_seq_len=16))


def block_inputs(model, noise, cond, seed=5):
    """Random joined tokens ``[B, L + N, D]`` and the model's ``temb`` for one call."""
    img, txt, temb = model.embed(noise, torch.full((noise.shape[0],), 0.6), cond)
    model._call.n_img = img.shape[1]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(torch.cat([txt, img], 1).shape, generator=g)
    return tokens, temb, txt.shape[1]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_every_restated_block_equals_the_diffusers_block_bit_for_bit(family):
    model, noise, (cond, _), _ = case(family)
    tokens, temb, n = block_inputs(model, noise, cond)
    kinds = []
    for raw, block in zip(model.raw_blocks(), model.blocks):
        kw = model.block_kwargs()
        txt_ref, img_ref = raw(hidden_states=tokens[:, n:].contiguous(), encoder_hidden_states=tokens[:, :n].contiguous(),
                               temb=temb, **kw)
        with torch.no_grad():
            out, a, m = block.forward_branches(tokens, temb)
        assert torch.equal(out[:, n:], img_ref)
        assert torch.equal(out[:, :n], tokens[:, :n] if txt_ref is None else txt_ref)
        assert a.shape == tokens.shape and (m is None or m.shape == tokens.shape)
        # Given branch outputs replace the computed ones; the gates are the current ones.
        again, _, _ = block.forward_branches(tokens, temb, attn_out=a, mlp_out=m)
        assert torch.equal(again, out)
        g_a, g_m = block.gates(temb)
        replay = tokens + (g_a.unsqueeze(1) if g_a.dim() == 2 else g_a) * a
        if m is not None:
            replay = replay + g_m * m
        torch.testing.assert_close(replay, out, rtol=1e-6, atol=1e-6)
        kinds.append("pre_only" if getattr(raw, "context_pre_only", False) else
                     "joint" if m is not None else "single")
        tokens = torch.randn_like(tokens)
    assert kinds == (["joint", "pre_only"] if family == "sd3" else ["joint", "single", "single"])


def test_the_joint_gates_are_per_token_and_the_single_gate_is_one_vector():
    model, noise, (cond, _), _ = case("flux")
    tokens, temb, n = block_inputs(model, noise, cond)
    joint, single = model.blocks[0], model.blocks[1]
    g_a, g_m = joint.gates(temb)
    img = joint.block.norm1.linear(F.silu(temb)).chunk(6, dim=1)
    txt = joint.block.norm1_context.linear(F.silu(temb)).chunk(6, dim=1)
    assert g_a.shape == g_m.shape == tokens.shape
    assert torch.equal(g_a[:, :n], txt[2].unsqueeze(1).expand(-1, n, -1))
    assert torch.equal(g_a[:, n:], img[2].unsqueeze(1).expand(-1, tokens.shape[1] - n, -1))
    assert torch.equal(g_m[:, :n], txt[5].unsqueeze(1).expand(-1, n, -1))
    g, none = single.gates(temb)
    assert none is None and torch.equal(g, single.block.norm.linear(F.silu(temb)).chunk(3, dim=1)[2])


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("spec", ["fora:interval=1", "taylorseer:interval=1", "taylorseer:interval=1,order=2,warmup=3",
                                  "fora:interval=1,cfg=split"])
def test_per_block_caches_at_full_compute_reproduce_the_uncached_bridge(family, spec):
    model, noise, (cond, neg), grid = case(family)
    # Split CFG runs each branch as its own batch, so its reference is the uncached split run.
    none = StepContext(block_policy=build_policy("none:cfg=split")) if "split" in spec else None
    ref = flowdit_euler(model, grid, noise, cond, neg, 3.0, ctx=none)
    policy = build_policy(spec)
    assert policy.cache == "blocks"
    out = flowdit_euler(model, grid, noise, cond, neg, 3.0, ctx=StepContext(block_policy=policy))
    assert torch.equal(out, ref)
    assert policy.stats.full_calls == policy.stats.calls


def spy(policy, model):
    """Record, for every call, the stack input, ``temb``, the output, whether it ran in
    full, and each block's pre-gate branches on the calls that ran them."""
    calls, run = [], policy.decide_and_run
    branches = []
    for block in model.blocks:
        def wrapped(*args, _f=block.forward_branches, **kw):
            out = _f(*args, **kw)
            branches.append((out[1], out[2]))
            return out
        block.forward_branches = wrapped

    def decide_and_run(m, tokens, c_act, ctx, st):
        full = policy.stats.full_calls
        branches.clear()
        out = run(m, tokens, c_act, ctx, st)
        calls.append({"tokens": tokens, "temb": c_act, "out": out, "step": ctx.step,
                      "full": policy.stats.full_calls > full, "branches": list(branches)})
        return out
    policy.decide_and_run = decide_and_run
    return calls


def restated_replay(model, tokens, temb, branches):
    """A cached call by hand: per stream, block ``i`` adds its current gates times the
    supplied pre-gate outputs; text rows take the context gates, a single-stream block
    its one gate."""
    n = model._call.n_txt
    x = tokens.clone()
    for raw, (a, m) in zip(model.raw_blocks(), branches):
        if hasattr(raw, "norm1_context"):
            img = raw.norm1.linear(F.silu(temb)).chunk(6, dim=1)
            x[:, n:] = x[:, n:] + img[2][:, None] * a[:, n:]
            x[:, n:] = x[:, n:] + img[5][:, None] * m[:, n:]
            if not getattr(raw, "context_pre_only", False):
                txt = raw.norm1_context.linear(F.silu(temb)).chunk(6, dim=1)
                x[:, :n] = x[:, :n] + txt[2][:, None] * a[:, :n]
                x[:, :n] = x[:, :n] + txt[5][:, None] * m[:, :n]
        else:
            assert m is None
            x = x + raw.norm.linear(F.silu(temb)).chunk(3, dim=1)[2][:, None] * a
    return x


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_skipping_fora_replays_the_cached_branches_under_the_current_gates(family):
    model, noise, (cond, neg), grid = case(family, steps=7)
    policy = build_policy("fora:interval=3")
    calls = spy(policy, model)
    with torch.no_grad():
        out = flowdit_euler(model, grid, noise, cond, neg, 2.0, ctx=StepContext(block_policy=policy))
        ref = flowdit_euler(model, grid, noise, cond, neg, 2.0)
    # FORA's count-down schedule over 7 calls: the first, then reverse indices 3 and 0.
    assert [c["full"] for c in calls] == [True, False, False, True, False, False, True]
    assert policy.stats.block_evals == 3.0
    cached = calls[1]
    assert cached["branches"] == []
    expect = restated_replay(model, cached["tokens"], cached["temb"], calls[0]["branches"])
    torch.testing.assert_close(cached["out"], expect, rtol=1e-6, atol=1e-6)
    assert 0 < (out - ref).abs().max() < 0.5 * ref.abs().max()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_taylorseer_per_block_forecast_is_the_taylor_formula_under_the_current_gates(family):
    model, noise, (cond, neg), grid = case(family, steps=6)
    policy = build_policy("taylorseer:interval=3,order=1")
    calls = spy(policy, model)
    with torch.no_grad():
        flowdit_euler(model, grid, noise, cond, neg, 2.0, ctx=StepContext(block_policy=policy))
    # Warm-up calls 0 and 1 full, then one full call every 3 calls.
    assert [c["full"] for c in calls] == [True, True, False, False, True, False]
    f0, f1 = calls[0]["branches"], calls[1]["branches"]
    for s in (2, 3):
        # First order about call 1, the slope from calls 0 and 1: f(s) = f1 + (f1 - f0)(s - 1).
        pred = [(a1 + (a1 - a0) * (s - 1), None if m1 is None else m1 + (m1 - m0) * (s - 1))
                for (a0, m0), (a1, m1) in zip(f0, f1)]
        expect = restated_replay(model, calls[s]["tokens"], calls[s]["temb"], pred)
        torch.testing.assert_close(calls[s]["out"], expect, rtol=1e-5, atol=1e-5)


def test_sd35_dual_attention_blocks_refuse_per_block_caches_by_name():
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                               pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
                               dual_attention_layers=(0,)).eval()
    model = wrap_transformer(tr)
    assert "block_branches" not in model.capabilities
    cond, _ = prompts(7, 64, 64)
    ctx = StepContext(block_policy=build_policy("fora"))
    ctx.begin(4, 4)
    with pytest.raises(ConfigError, match=r"--accel fora.* SD3Transformer does not offer.*cache=stack"):
        model(torch.randn(2, 4, 16, 16), 0.5, cond, ctx=ctx)
    # Stack-level caches still run on it.
    ctx = StepContext(block_policy=build_policy("fora:interval=1,cache=stack"))
    ctx.begin(4, 4)
    assert model(torch.randn(2, 4, 16, 16), 0.5, cond, ctx=ctx).shape == (2, 4, 16, 16)
