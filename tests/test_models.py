"""DiT: shapes for every registry entry, adaLN-Zero identity at init, public parameter
names, positional encoding, attention processors."""

import math

import pytest
import torch

from flowdit.errors import ConfigError
from flowdit.models import MODEL_CONFIGS, MathProcessor, SDPAProcessor, build_model
from flowdit.models.layers import sincos_pos_embed_2d, timestep_embedding

SMALL = {"DiT-digits": (8, 1), "DiT-mnist": (28, 1), "DiT-mnist/2": (28, 1), "DiT-tiny": (8, 3)}


def _inputs(B, C, S, K=10, device=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, S, S, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, K, (B,), generator=g)
    if device is not None:
        x, t, y = x.to(device), t.to(device), y.to(device)
    return x, t, y


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_forward_shape_every_registry_entry(name):
    S, C = SMALL.get(name, (16, 4))
    p = MODEL_CONFIGS[name]["patch_size"]
    S = max(S, 2 * p) if S % p == 0 else 2 * p
    small = name in SMALL
    ctx = torch.device("cpu") if small else torch.device("meta")  # paper sizes: shapes only
    with ctx:
        model = build_model(name, S, C, 10)
        x, t, y = _inputs(2, C, S, device=ctx)
        out = model(x, t, y)
    assert out.shape == x.shape
    assert model.config.num_tokens == (S // p) ** 2


def test_paper_parameter_counts():
    # DiT paper table 1 (with 8 learned-sigma output channels): S/2 33M, B/2 130M, L/2 458M, XL/2 675M.
    paper = {"DiT-S/2": 33e6, "DiT-B/2": 130e6, "DiT-L/2": 458e6, "DiT-XL/2": 675e6}
    for name, n in paper.items():
        with torch.device("meta"):
            model = build_model(name, 32, 4, 1000)
        assert abs(model.param_count() - n) / n < 0.02, (name, model.param_count())


def test_public_checkpoint_parameter_names():
    keys = set(build_model("DiT-tiny", 8, 4, 10).state_dict())
    expected = {
        "x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.bias", "blocks.0.adaLN_modulation.1.weight",
        "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight",
    }
    assert expected <= keys
    # The null class for guidance is one extra row of the label table.
    assert build_model("DiT-tiny", 8, 4, 10).y_embedder.embedding_table.weight.shape[0] == 11


def test_adaln_zero_block_is_identity_and_output_zero_at_init():
    torch.manual_seed(0)
    model = build_model("DiT-tiny", 8, 3, 10)
    x, t, y = _inputs(3, 3, 8)
    tokens, c_act = model.embed(x, t, y)
    for block in model.blocks:
        assert torch.equal(block(tokens, c_act), tokens)
    assert torch.count_nonzero(model(x, t, y)) == 0


def test_pos_embed_matches_sincos_formula():
    D, g = 16, 4
    emb = sincos_pos_embed_2d(D, g)
    assert emb.shape == (g * g, D)
    row, col = 2, 3
    tok = emb[row * g + col]
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    # First half encodes the column (x) coordinate, second half the row, each [sin, cos].
    ref = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(tok.double(), ref, atol=1e-6, rtol=0)


def test_timestep_embedding_values():
    t = torch.tensor([0.0, 3.0])
    e = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    torch.testing.assert_close(e[0], torch.cat([torch.ones(4), torch.zeros(4)]))


def test_unpatchify_inverts_patch_order():
    model = build_model("DiT-tiny", 8, 3, 10)
    p, C = model.patch_size, 3
    x = torch.randn(2, C, 8, 8)
    # Patchify in the same row-major token order as the Conv2d patch embedding.
    patches = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, g, g, p, p]
    tokens = patches.permute(0, 2, 3, 4, 5, 1).reshape(2, 16, p * p * C)
    assert torch.equal(model.unpatchify(tokens), x)


def _trained_like(model):
    # Give every weight (including the zero-initialised ones) a non-trivial value.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_processors_agree(qk_norm):
    model = _trained_like(build_model("DiT-tiny", 8, 3, 10, qk_norm=qk_norm))
    x, t, y = _inputs(2, 3, 8)
    ref = model(x, t, y)
    model.set_attn_processor(MathProcessor())
    assert all(isinstance(a.processor, MathProcessor) for a in model.attention_modules())
    torch.testing.assert_close(model(x, t, y), ref, atol=1e-5, rtol=1e-4)
    assert torch.count_nonzero(ref) > 0


def test_custom_processor_per_layer_is_called():
    model = _trained_like(build_model("DiT-tiny", 8, 3, 10))
    calls = []

    class Recording(SDPAProcessor):
        def __init__(self, i):
            self.i = i

        def __call__(self, attn, x, ctx=None):
            calls.append(self.i)
            return super().__call__(attn, x, ctx)

    model.set_attn_processor({1: Recording(1)})
    x, t, y = _inputs(2, 3, 8)
    model(x, t, y)
    assert calls == [1]
    assert isinstance(model.blocks[0].attn.processor, SDPAProcessor)


def test_null_label_default_and_bf16_autocast_close_to_fp32():
    model = _trained_like(build_model("DiT-tiny", 8, 3, 10))
    x, t, _ = _inputs(4, 3, 8)
    null = torch.full((4,), model.null_class)
    assert torch.equal(model(x, t, None), model(x, t, null))
    ref = model(x, t, null)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, null)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() / ref.abs().max() < 0.05


def test_cpu_bf16_training_attention_runs_in_fp32(monkeypatch):
    """Under bf16 autocast on a CPU, a differentiated attention call hands fp32 q/k/v to
    SDPA (its bf16 backward is the slow kernel there); inference keeps bf16; gradients of
    the bf16 step stay close to fp32's."""
    import torch.nn.functional as F

    import flowdit.models.attention as attention

    model = _trained_like(build_model("DiT-tiny", 8, 3, 10))
    x, t, y = _inputs(4, 3, 8)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *a, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    ref = torch.autograd.grad(model(x, t, y).square().mean(), model.blocks[0].attn.qkv.weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    g = torch.autograd.grad(out.float().square().mean(), model.blocks[0].attn.qkv.weight)[0]
    depth = len(model.blocks)
    assert seen[:depth] == [(torch.float32, False)] * depth  # fp32 model, no autocast
    assert seen[depth:] == [(torch.float32, False)] * depth  # bf16 training: upcast, autocast off
    assert (g - ref).norm() / ref.norm() < 0.05
    seen.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y)
    assert seen == [(torch.bfloat16, True)] * depth  # inference keeps the bf16 kernel


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="patch_size"):
        build_model("DiT-tiny", 7, 3, 10)
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("DiT-XXL/2", 32, 4, 10)
    with pytest.raises(ConfigError, match="num_heads"):
        build_model("DiT-tiny", 8, 3, 10, num_heads=3)
    with pytest.raises(ValueError, match="expected x"):
        build_model("DiT-tiny", 8, 3, 10)(torch.randn(1, 1, 8, 8), torch.rand(1))


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing blocks in backward changes memory, not math: same loss, same gradients."""
    torch.manual_seed(0)
    model = build_model("DiT-tiny", 8, 1, 10)
    for block in model.blocks:  # adaLN-Zero would make the blocks the identity
        torch.nn.init.normal_(block.adaLN_modulation[1].weight, std=0.1)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])

    def grads(flag):
        model.zero_grad(set_to_none=True)
        model.grad_checkpointing = flag
        loss = model(x, t, y).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (l0, g0), (l1, g1) = grads(False), grads(True)
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():  # without a graph the flag changes nothing
        on = model(x, t, y)
        model.grad_checkpointing = False
        assert torch.equal(on, model(x, t, y))


def test_bf16_fast_path_samples_match_fp32():
    """The whole sampler under bf16 autocast (weights fp32, the loop's state fp32) lands
    within a few percent of the fp32 samples: errors of one evaluation do not compound
    along a guided 8-step Heun trajectory."""
    from flowdit.inference import generate

    model = _trained_like(build_model("DiT-tiny", 8, 3, 10))
    labels = torch.arange(16) % 10
    kw = dict(solver="heun", steps=8, cfg_scale=1.5, seed=3)
    ref = generate(model, labels, (3, 8, 8), **kw).images
    fast = generate(model, labels, (3, 8, 8), amp_dtype=torch.bfloat16, **kw).images
    assert fast.dtype == torch.float32
    err = (fast - ref).abs()
    # measured: max 0.005, mean 0.0007 on images in [-1, 1]
    assert err.max() < 0.02 and err.mean() < 0.003, (err.max(), err.mean())
