"""flowdit's MMDiT (SD3 double-stream and FLUX-style single-stream blocks): shapes, adaLN-Zero
initialisation, the text mask, joint attention, RoPE, the block-policy and attention-hook
extension points, gradients, the registry's paper sizes against diffusers, weight import."""

import pytest
import torch

from flowdit.accel import build_policy
from flowdit.core.hooks import StepContext
from flowdit.edit import inversion_grid, model_velocity, value_sharing
from flowdit.errors import ConfigError
from flowdit.models import MMDIT_CONFIGS, MMDiT, build_model, text_condition
from flowdit.models.mmdit import (JointBlock, SingleBlock, apply_rope, image_position_ids, rope_frequencies,
                                  sincos_pos_embed_grid)
from flowdit.sampling import sample

VARIANTS = ("MMDiT-tiny", "FLUX-tiny")


def _randomised(name, seed=0, **overrides):
    """A registry model with random weights (adaLN-Zero starts as the identity with a zero output)."""
    torch.manual_seed(seed)
    model = build_model(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _cond(B=2, L=5, text_dim=24, pooled_dim=16, mask=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.ones(B, L, dtype=torch.bool)
    if mask:
        m[0, 3:] = False
    return text_condition(torch.randn(B, L, text_dim, generator=g), torch.randn(B, pooled_dim, generator=g),
                          mask=m if mask else None)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return _randomised(request.param)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (6, 4)])
def test_velocity_is_shaped_like_the_input_for_square_and_non_square_grids(name, hw):
    model = _randomised(name)
    x = torch.randn(2, 4, *hw)
    with torch.no_grad():
        v = model(x, torch.rand(2), _cond())
    assert v.shape == x.shape and torch.isfinite(v).all()


def test_unpatchify_inverts_the_patch_order_on_a_non_square_grid():
    model = build_model("MMDiT-tiny")
    p, C, h, w = 2, 4, 3, 5
    x = torch.randn(1, C, h * p, w * p)
    tokens = x.reshape(1, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(1, h * w, p * p * C)
    torch.testing.assert_close(model.unpatchify(tokens, h, w), x, rtol=0, atol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_adaln_zero_initialisation_gives_a_zero_output(name):
    model = build_model(name)
    with torch.no_grad():
        v = model(torch.randn(2, 4, 8, 8), torch.rand(2), _cond())
    assert torch.count_nonzero(v) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0


def test_masked_text_tokens_do_not_change_the_output(model):
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), _cond()
    y2 = dict(y, tokens=y["tokens"].clone())
    y2["tokens"][0, 3:] = 100.0 * torch.randn(2, 24)  # the masked-out positions of row 0
    with torch.no_grad():
        v, v2 = model(x, t, y), model(x, t, y2)
    torch.testing.assert_close(v2, v, rtol=0, atol=1e-6)
    # ... while a real token does change it
    y3 = dict(y, tokens=y["tokens"].clone())
    y3["tokens"][0, 1] += 1.0
    with torch.no_grad():
        assert (model(x, t, y3)[0] - v[0]).abs().max() > 1e-3


def test_an_all_true_mask_equals_no_mask(model):
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), _cond(mask=False)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, dict(y, mask=torch.ones(2, 5, dtype=torch.bool))), model(x, t, y),
                                   rtol=1e-5, atol=1e-6)


def test_text_tokens_and_pooled_vector_influence_the_image_output(model):
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), _cond(mask=False)
    with torch.no_grad():
        v = model(x, t, y)
        v_tok = model(x, t, dict(y, tokens=y["tokens"].roll(1, dims=0)))  # swap the rows' token sequences
        v_pool = model(x, t, dict(y, pooled=torch.zeros_like(y["pooled"])))
    for other in (v_tok, v_pool):
        diff = (other - v).abs().amax(dim=(1, 2, 3))
        assert (diff > 1e-2 * v.abs().amax()).all()


def test_the_output_depends_on_the_time(model):
    x, y = torch.randn(2, 4, 8, 8), _cond()
    with torch.no_grad():
        assert (model(x, torch.full((2,), 0.2), y) - model(x, torch.full((2,), 0.7), y)).abs().max() > 1e-3


def test_rope_scores_depend_only_on_relative_positions():
    torch.manual_seed(0)
    dims, n_txt, h, w = (4, 6, 6), 3, 4, 5
    q, k = torch.randn(1, 2, n_txt + h * w, 16), torch.randn(1, 2, n_txt + h * w, 16)

    def scores(ids):
        rope = rope_frequencies(ids, dims)
        return apply_rope(q, rope) @ apply_rope(k, rope).transpose(-2, -1)

    img = image_position_ids(h, w)
    base = scores(torch.cat([torch.zeros(n_txt, 3), img]))
    shifted = scores(torch.cat([torch.zeros(n_txt, 3), img + torch.tensor([0.0, 7.0, -3.0])]))
    # image-image scores unchanged; text (at ids 0) against image changes
    torch.testing.assert_close(shifted[..., n_txt:, n_txt:], base[..., n_txt:, n_txt:], rtol=1e-4, atol=1e-4)
    assert (shifted[..., :n_txt, n_txt:] - base[..., :n_txt, n_txt:]).abs().max() > 1e-2
    # shifting every id (text too) changes nothing; zero ids are the identity rotation
    everything = scores(torch.cat([torch.zeros(n_txt, 3), img]) + torch.tensor([2.0, 5.0, 1.0]))
    torch.testing.assert_close(everything, base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(apply_rope(q, rope_frequencies(torch.zeros(q.shape[2], 3), dims)), q)


def test_rope_rotates_adjacent_pairs_with_per_axis_frequencies():
    ids = torch.tensor([[0.0, 1.0, 2.0]])
    cos, sin = rope_frequencies(ids, (2, 2, 4), theta=10000.0)
    expected = torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 0.02, 0.02])  # angles ids[a] * theta^(-2i/dim_a)
    torch.testing.assert_close(cos[0], expected.cos())
    torch.testing.assert_close(sin[0], expected.sin())
    x = torch.tensor([1.0, 0.0] * 4).view(1, 1, 1, 8)
    out = apply_rope(x, (cos, sin))[0, 0, 0]
    torch.testing.assert_close(out[0::2], expected[0::2].cos())
    torch.testing.assert_close(out[1::2], expected[0::2].sin())


def test_sincos_positions_match_the_square_dit_table_and_crop_like_sd3():
    from flowdit.models.layers import sincos_pos_embed_2d

    torch.testing.assert_close(sincos_pos_embed_grid(32, 6, 6), sincos_pos_embed_2d(32, 6))
    # a crop of the max grid is the same rows and columns of the full table
    full = sincos_pos_embed_grid(32, 10, 10, max_size=10, base_size=5).view(10, 10, 32)
    crop = sincos_pos_embed_grid(32, 4, 6, max_size=10, base_size=5).view(4, 6, 32)
    torch.testing.assert_close(crop, full[3:7, 2:8])
    with pytest.raises(ConfigError, match="exceeds pos_embed_max_size"):
        sincos_pos_embed_grid(32, 11, 4, max_size=10)


def test_block_structure_and_rf_edit_blocks():
    sd3 = build_model("MMDiT-tiny")
    assert all(isinstance(b, JointBlock) for b in sd3.blocks)
    assert sd3.blocks[-1].context_pre_only and not sd3.blocks[0].context_pre_only
    assert sd3.rf_edit_blocks() == [1]
    flux = build_model("FLUX-tiny")
    assert [type(b) for b in flux.blocks] == [JointBlock, SingleBlock, SingleBlock]
    assert not flux.blocks[0].context_pre_only
    assert flux.rf_edit_blocks() == [2]  # round(20 * 2 / 38) = 1: single block 1 of 0..1
    with torch.device("meta"):
        big = build_model("FLUX-like")
    assert big.rf_edit_blocks() == list(range(19 + 20, 19 + 38))  # the reference's single blocks 20-37
    assert len(big.attention_modules()) == 57
    assert sd3.null_class is None and sd3.capabilities == frozenset()


def test_single_stream_blocks_are_used():
    model = _randomised("FLUX-tiny")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), _cond()
    with torch.no_grad():
        v = model(x, t, y)
        model.blocks[2].linear2.weight.mul_(0.0)
        model.blocks[2].linear2.bias.mul_(0.0)
        v_skip = model(x, t, y)
    assert (v - v_skip).abs().max() > 1e-3


@pytest.mark.parametrize("spec", ["fora:interval=1,cache=stack", "taylorseer:interval=1,cache=stack",
                                  "teacache:threshold=0", "fbcache:threshold=0"])
def test_a_cache_at_full_compute_reproduces_the_model_bit_for_bit(model, spec):
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), _cond()
    ctx = StepContext(block_policy=build_policy(spec))
    with torch.no_grad():
        ref = model(x, t, y)
        for step in range(3):
            ctx.step = step
            torch.testing.assert_close(model(x, t, y, ctx=ctx), ref, rtol=0, atol=0)


def test_a_cache_skips_calls_on_the_joined_sequence(model):
    x, y = torch.randn(2, 4, 8, 8), _cond()
    ctx = StepContext(block_policy=build_policy("fora:interval=2,cache=stack"))
    fn = model_velocity(model, y, ctx=ctx)
    out = sample(fn, x, "euler", steps=4, step_context=ctx).x
    stats = ctx.block_policy.stats
    assert torch.isfinite(out).all() and stats.full_calls < stats.calls == 4


def test_per_block_caches_are_refused_by_name(model):
    ctx = StepContext(block_policy=build_policy("fora:interval=2"))
    with pytest.raises(ConfigError, match="block_branches.*cache=stack"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), _cond(B=1), ctx=ctx)


def test_rf_edit_value_sharing_records_the_joined_values_on_the_chosen_layers(model):
    x, y = torch.randn(2, 4, 8, 8), _cond()
    sharing = value_sharing(model)
    sharing.plan = lambda i: "record"
    ctx = StepContext(hooks=[sharing])
    sample(model_velocity(model, y, ctx=ctx), x, "euler", schedule=inversion_grid(2), step_context=ctx)
    chosen = model.rf_edit_blocks()
    assert sharing.blocks == chosen
    assert sorted({b for (_, _, b) in sharing.store}) == chosen
    heads = model.config.num_heads
    for v in sharing.store.values():
        assert v.shape == (2, heads, 5 + 16, model.config.head_dim)  # [B, H, L + N, Dh]
    # injecting the recorded values changes the velocity of another image
    sharing.plan = lambda i: "inject"
    x2 = torch.randn(2, 4, 8, 8)
    ctx.begin(2, 2)
    ctx.t_step, ctx.t_next, ctx.t = 0.0, 0.5, 0.0
    for hook in ctx.hooks.begin_evaluation:
        hook(ctx)
    with torch.no_grad():
        injected = model(x2, torch.zeros(2), y, ctx=ctx)
        plain = model(x2, torch.zeros(2), y)
    assert (injected - plain).abs().max() > 1e-4


def test_gradient_reaches_both_streams_and_checkpointing_agrees():
    model = _randomised("FLUX-tiny").train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), _cond()
    model(x, t, y).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in ("x_embedder.proj.weight", "context_embedder.weight", "pooled_embedder.0.weight",
                 "blocks.0.attn.qkv_txt.weight", "blocks.0.mlp_txt.fc1.weight", "blocks.0.mlp.fc1.weight",
                 "blocks.2.attn.qkv.weight", "t_embedder.mlp.0.weight"):
        assert grads[name].abs().max() > 0, name
    model.zero_grad()
    model.grad_checkpointing = True
    model(x, t, y).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)


def test_guidance_embedding_is_read_from_the_condition():
    model = _randomised("FLUX-tiny", guidance_embed=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), _cond()
    with pytest.raises(ConfigError, match="guidance"):
        model(x, t, y)
    with torch.no_grad():
        a = model(x, t, dict(y, guidance=torch.full((2,), 3.5)))
        b = model(x, t, dict(y, guidance=torch.full((2,), 1.0)))
    assert (a - b).abs().max() > 1e-3


def test_bad_inputs_and_configs_are_refused():
    model = build_model("MMDiT-tiny")
    with pytest.raises(ConfigError, match="text condition"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ConfigError, match="divisible by the patch size"):
        model(torch.randn(1, 4, 7, 8), torch.rand(1), _cond(B=1))
    with pytest.raises(ConfigError, match="tokens"):
        model(torch.randn(1, 4, 8, 8), torch.rand(1), _cond(B=1, text_dim=8))
    with pytest.raises(ConfigError, match="axes_dims"):
        build_model("FLUX-tiny", axes_dims=(4, 4, 4))
    with pytest.raises(ConfigError, match="unknown model option"):
        build_model("MMDiT-tiny", num_classes_x=3)
    with pytest.raises(RuntimeError, match="inside MMDiT.forward"):
        model.blocks[0](torch.randn(1, 4, 32), torch.randn(1, 32))
    assert isinstance(build_model("MMDiT-tiny", input_size=16, in_channels=3), MMDiT)
    assert build_model("DiT-tiny", 8, 4, 10).config.num_classes == 10  # the DiT entries are unchanged


# -- the paper sizes against diffusers, on the meta device ------------------------------

def _count(m):
    return sum(p.numel() for p in m.parameters())


def _diffusers_reference(name):
    diffusers = pytest.importorskip("diffusers")
    sd3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, joint_attention_dim=4096,
               pooled_projection_dim=2048, pos_embed_max_size=192, attention_head_dim=64)
    if name == "SD3-medium":
        return diffusers.SD3Transformer2DModel(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, **sd3)
    if name == "SD3.5-large":
        return diffusers.SD3Transformer2DModel(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                               qk_norm="rms_norm", **sd3)
    return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                            pooled_projection_dim=768, guidance_embeds=name.endswith("dev"),
                                            axes_dims_rope=(16, 56, 56))


EXPECTED = {"SD3-medium": 2_028_328_000, "SD3.5-large": 8_056_627_520, "FLUX-like": 11_891_178_560,
            "FLUX-like dev": 11_901_408_320}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_sizes_have_exactly_the_parameters_of_diffusers_models(name):
    with torch.device("meta"):
        ref = _diffusers_reference(name)
        ours = build_model(name.split()[0], guidance_embed=name.endswith("dev"))
    assert _count(ours) == _count(ref) == EXPECTED[name]


def test_every_registry_entry_builds_on_meta():
    for name in MMDIT_CONFIGS:
        with torch.device("meta"):
            assert _count(build_model(name)) > 0


def test_weights_imported_from_a_tiny_diffusers_sd3_give_the_same_velocity():
    diffusers = pytest.importorskip("diffusers")
    from flowdit.interop.mmdit_weights import mmdit_from_diffusers_sd3

    torch.manual_seed(0)
    for qk in (None, "rms_norm"):
        tr = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                             caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=12,
                                             qk_norm=qk).eval()
        with torch.no_grad():
            for p in tr.parameters():
                p.normal_(0, 0.2)
        model = mmdit_from_diffusers_sd3(tr)
        x, t = torch.randn(2, 4, 8, 6), torch.rand(2)
        tokens, pooled = torch.randn(2, 5, 12), torch.randn(2, 10)
        with torch.no_grad():
            ref = tr(x, encoder_hidden_states=tokens, pooled_projections=pooled, timestep=1000 * t).sample
            v = model(x, t, text_condition(tokens, pooled))
        torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)
