"""DDT (flowdit.models.ddt) and its encoder sharing (flowdit.accel.ddt_share): shapes, the
reference's initialisation, the reference forward restated from MCG-NJU/DDT on the same
weights, the reference's dynamic programme restated from tools/dp.py (and brute force), the
similarity of sharing_dp, sharing at full compute equal to plain sampling, a trained run
loading back."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowdit.accel import build_policy
from flowdit.accel.ddt_share import DDTShare, dp_schedule, encoder_similarity, schedule_cost, uniform_schedule
from flowdit.errors import ConfigError
from flowdit.inference import generate, load_run_model, model_velocity
from flowdit.models import DDT, build_model
from flowdit.models.ddt import ddt_rope
from flowdit.sampling.context import StepContext
from flowdit.sampling.sample import sample

torch.set_num_threads(1)


# -- the reference, restated -------------------------------------------------------------
# MCG-NJU/DDT, src/models/denoiser/decoupled_improved_dit.py: RMSNorm, FeedForward,
# precompute_freqs_cis_2d, apply_rotary_emb, RAttention, DDTBlock, FinalLayer, Embed,
# TimestepEmbedder (max_period 10), LabelEmbedder, DDT.__init__ / initialize_weights / forward.
# Construction order and parameter names as there; tau = 1 is data, output x0 - eps.


class RefRMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, h):
        dt, h = h.dtype, h.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(dt)


class RefFeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.w1, self.w3, self.w2 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), \
            nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def ref_freqs_cis_2d(dim, height, width, theta=10000.0, scale=16.0):
    x_pos, y_pos = torch.linspace(0, scale, width), torch.linspace(0, scale, height)
    y_pos, x_pos = torch.meshgrid(y_pos, x_pos, indexing="ij")
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 4)[: (dim // 4)].float() / dim))
    x_cis = torch.polar(torch.ones(height * width, dim // 4), torch.outer(x_pos.reshape(-1), freqs).float())
    y_cis = torch.polar(torch.ones(height * width, dim // 4), torch.outer(y_pos.reshape(-1), freqs).float())
    return torch.cat([x_cis.unsqueeze(-1), y_cis.unsqueeze(-1)], dim=-1).reshape(height * width, -1)


def ref_rotary(xq, xk, freqs_cis):
    f = freqs_cis[None, :, None, :]
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    return torch.view_as_real(xq_ * f).flatten(3).type_as(xq), torch.view_as_real(xk_ * f).flatten(3).type_as(xk)


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, hd = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_norm, self.k_norm = RefRMSNorm(hd), RefRMSNorm(hd)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, pos):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 1, 3, 4)
        q, k = ref_rotary(self.q_norm(q), self.k_norm(k), pos)
        q, k, v = (z.view(B, -1, self.num_heads, C // self.num_heads).transpose(1, 2) for z in (q, k, v))
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def ref_modulate(x, shift, scale):
    return x * (1 + scale) + shift


class RefBlock(nn.Module):
    def __init__(self, d, groups, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn, self.norm2 = RefRMSNorm(d), RefAttention(d, groups), RefRMSNorm(d)
        self.mlp = RefFeedForward(d, int(d * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.Linear(d, 6 * d))

    def forward(self, x, c, pos):
        sa, ca, ga, sm, cm, gm = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + ga * self.attn(ref_modulate(self.norm1(x), sa, ca), pos)
        return x + gm * self.mlp(ref_modulate(self.norm2(x), sm, cm))


class RefEmbed(nn.Module):
    def __init__(self, i, d):
        super().__init__()
        self.proj = nn.Linear(i, d)


class RefTimestep(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):
        half = 128
        freqs = torch.exp(-math.log(10) * torch.arange(0, half, dtype=torch.float32) / half)
        args = t[..., None].float() * freqs[None, ...]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class RefLabel(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.embedding_table = nn.Embedding(n, d)


class RefFinal(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, out)
        self.adaLN_modulation = nn.Sequential(nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(ref_modulate(self.norm_final(x), shift, scale))


class RefDDT(nn.Module):
    def __init__(self, in_channels, num_groups, hidden_size, num_blocks, num_encoder_blocks, patch_size, num_classes):
        super().__init__()
        C, p, D = in_channels, patch_size, hidden_size
        self.D, self.p, self.groups, self.E, self.L = D, p, num_groups, num_encoder_blocks, num_blocks
        self.x_embedder, self.s_embedder = RefEmbed(C * p * p, D), RefEmbed(C * p * p, D)
        self.t_embedder, self.y_embedder = RefTimestep(D), RefLabel(num_classes + 1, D)
        self.final_layer = RefFinal(D, C * p * p)
        self.blocks = nn.ModuleList([RefBlock(D, num_groups) for _ in range(num_blocks)])
        for emb in (self.x_embedder, self.s_embedder):  # initialize_weights
            nn.init.xavier_uniform_(emb.proj.weight.data.view([emb.proj.weight.shape[0], -1]))
            nn.init.constant_(emb.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for w in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.constant_(w, 0)

    def forward(self, x, t, y, s=None):
        B, _, H, W = x.shape
        pos = ref_freqs_cis_2d(self.D // self.groups, H // self.p, W // self.p)
        x = F.unfold(x, kernel_size=self.p, stride=self.p).transpose(1, 2)
        t = self.t_embedder(t.view(-1)).view(B, -1, self.D)
        c = F.silu(t + self.y_embedder.embedding_table(y).view(B, 1, self.D))
        if s is None:
            s = self.s_embedder.proj(x)
            for i in range(self.E):
                s = self.blocks[i](s, c, pos)
            s = F.silu(t + s)
        x = self.x_embedder.proj(x)
        for i in range(self.E, self.L):
            x = self.blocks[i](x, s, pos)
        x = self.final_layer(x, s)
        return F.fold(x.transpose(1, 2).contiguous(), (H, W), kernel_size=self.p, stride=self.p), s


def ref_pair(name="DDT-tiny", size=8, channels=3, classes=10, seed=0, **over):
    """flowdit's DDT and the restated reference built with the same seed."""
    torch.manual_seed(seed)
    ours = build_model(name, size, channels, classes, **over)
    cfg = ours.config
    torch.manual_seed(seed)
    ref = RefDDT(channels, cfg.num_heads, cfg.hidden_size, cfg.depth, cfg.encoder_depth, cfg.patch_size, classes)
    return ours, ref


def _perturb_output_layer(*models, seed=1):
    g = torch.Generator().manual_seed(seed)
    for name, p in models[0].final_layer.named_parameters():
        w = torch.randn(p.shape, generator=g) * 0.2
        for m in models:
            dict(m.final_layer.named_parameters())[name].data.copy_(w)


def _inputs(B=3, C=3, S=8, K=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, S, S, generator=g), torch.rand(B, generator=g), torch.randint(0, K, (B,), generator=g)


# -- the model ---------------------------------------------------------------------------


def test_forward_shapes_state_and_decoder():
    model = build_model("DDT-tiny", 8, 3, 10)
    x, t, y = _inputs()
    assert model(x, t, y).shape == x.shape and model(x, t).shape == x.shape  # y=None: the null class
    s = model.encoder_state(x, t, y)
    assert s.shape == (3, 16, 32)
    _perturb_output_layer(model)
    v, s2 = model.forward_with_state(x, t, y)
    assert torch.equal(s2, s) and torch.equal(model.decode(x, s), v) and torch.equal(model(x, t, y), v)
    # A non-square image has its own grid of rotary positions.
    assert model(torch.randn(2, 3, 8, 12), torch.rand(2), torch.tensor([0, 1])).shape == (2, 3, 8, 12)
    for name, (E, Dd) in {"DDT-mnist": (4, 2), "DDT-mnist-3d3": (3, 3)}.items():
        m = build_model(name, 28, 1, 10)
        assert (m.config.encoder_depth, m.config.decoder_depth, m.config.hidden_size, m.config.num_heads,
                m.patch_size) == (E, Dd, 128, 4, 4)
        assert len(m.encoder_blocks) == E and len(m.decoder_blocks) == Dd
        assert m(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])).shape == (2, 1, 28, 28)
    with pytest.raises(ConfigError, match="depth"):
        build_model("DDT-tiny", 8, 3, 10, depth=4)  # a DDT has encoder_depth and decoder_depth


def test_init_is_the_references_and_the_output_starts_at_zero():
    ours, ref = ref_pair()
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert set(sd_o) == set(sd_r)  # the reference's parameter names, key by key
    for k in sd_r:
        assert torch.equal(sd_o[k], sd_r[k]), k  # same seed, same construction order, same init rules
    x, t, y = _inputs()
    assert torch.equal(ours(x, t, y), torch.zeros_like(x))
    # The reference zeroes only the output layer: the blocks' adaLN keeps PyTorch's default.
    assert ours.blocks[0].adaLN_modulation[0].weight.abs().sum() > 0
    assert torch.equal(ours.x_embedder.proj.bias, torch.zeros(32))


def test_forward_equals_the_restated_reference_on_the_same_weights():
    ours, ref = ref_pair()
    _perturb_output_layer(ours, ref)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():  # move every weight off its initial value
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ours.load_state_dict(ref.state_dict())
    x, t, y = _inputs()
    with torch.no_grad():
        out_ref, s_ref = ref(x, 1 - t, y)  # the reference's time: tau = 1 - t
        v, s = ours.forward_with_state(x, t, y)
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, -out_ref, rtol=1e-5, atol=1e-5)  # v = eps - x0 = -(x0 - eps)
        # A shared state: the decoder at another time from the state of this one.
        x2 = torch.randn_like(x)
        torch.testing.assert_close(ours.decode(x2, s), -ref(x2, 1 - t.flip(0), y, s=s_ref)[0], rtol=1e-5, atol=1e-5)
    assert v.abs().max() > 0.1
    assert torch.equal(ddt_rope(16, 3, 5), ref_freqs_cis_2d(16, 3, 5))  # precompute_freqs_cis_2d


# -- the dynamic programme -----------------------------------------------------------------


def ref_dp(error_map, num_steps, num_recompute_timesteps):
    """tools/dp.py (and EulerSampler.sharing_dp), restated on a list-of-lists error map."""
    error_map = [list(map(float, row)) for row in error_map]
    for i in range(1, num_steps):
        for j in range(0, i):
            error_map[i][j] = error_map[i - 1][j] + error_map[i][j]
    C = [[0.0] * (num_steps + 1) for _ in range(num_recompute_timesteps + 1)]
    P = [[-1] * (num_steps + 1) for _ in range(num_recompute_timesteps + 1)]
    for i in range(1, num_steps + 1):
        C[1][i] = error_map[i - 1][0]
        P[1][i] = 0
    for step in range(2, num_recompute_timesteps + 1):
        for i in range(step, num_steps + 1):
            min_value, min_index = 99999, -1
            for j in range(step - 1, i):
                value = C[step - 1][j] + error_map[i - 1][j]
                if value < min_value:
                    min_value, min_index = value, j
            C[step][i], P[step][i] = min_value, min_index
    timesteps = [num_steps]
    for i in range(num_recompute_timesteps, 0, -1):
        timesteps.append(P[i][timesteps[-1]])
    timesteps.reverse()
    return timesteps[:-1]


def test_dp_equals_the_reference_dp_and_brute_force():
    # tools/dp.py's own case: integer similarities, a block of identical states, ties.
    for seed in range(5):
        torch.manual_seed(seed)
        sim = torch.randint(0, 100, (10, 10))
        sim[:5, :5] = 100
        sim.fill_diagonal_(100)
        err = (100 - sim).numpy()
        for K in range(1, 11):
            assert dp_schedule(err, K) == ref_dp(err.tolist(), 10, K), (seed, K)
    # Float similarities of a drifting state (the sampler's case), against every K-subset.
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 4, 8, generator=g)]
    for _ in range(7):
        states.append(states[-1] + 0.4 * torch.randn(2, 4, 8, generator=g))
    err = (1 - encoder_similarity(states)).numpy()
    n = len(states)
    for K in range(1, n + 1):
        steps = dp_schedule(err, K)
        assert steps == ref_dp(err.tolist(), n, K)
        assert steps[0] == 0 and len(steps) == K and steps == sorted(set(steps))
        best = min(schedule_cost(err, [0, *rest]) for rest in itertools.combinations(range(1, n), K - 1))
        assert schedule_cost(err, steps) == pytest.approx(best, abs=1e-12)
    assert dp_schedule(err, n) == list(range(n))
    assert uniform_schedule(10, 3) == [0, 3, 6, 9]


def test_similarity_is_sharing_dps():
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(4, 5, 6, generator=g) for _ in range(6)]
    # sharing_dp: stack [N, B, L, C] -> [B L, N, C], normalise, bmm, mean over tokens.
    st = torch.stack(states).double()
    N, B, L, C = st.shape
    st = F.normalize(st.view(N, B * L, C).permute(1, 0, 2), dim=-1)
    ref = torch.bmm(st, st.transpose(1, 2)).mean(dim=0)
    torch.testing.assert_close(encoder_similarity(states), ref, rtol=0, atol=1e-12)


# -- sharing at sampling --------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("DDT-tiny", 8, 3, 10)
    _perturb_output_layer(m)
    return m.eval()


KW = dict(solver="euler", steps=6, cfg_scale=1.5, seed=1)


def test_sharing_at_every_call_is_plain_sampling_exactly(model):
    labels = torch.arange(4)
    plain = generate(model, labels, (3, 8, 8), **KW).images
    for spec in ("ddt_share", "ddt_share:interval=1,cfg=split", "ddt_share:schedule=dp,k=6",
                 "ddt_share:recompute=0/1/2/3/4/5"):
        policy = build_policy(spec)
        out = generate(model, labels, (3, 8, 8), accel=policy, **KW).images
        assert torch.equal(out, plain), spec
        assert policy.stats.full_calls == policy.stats.calls
    heun = dict(KW, solver="heun", steps=3)  # 6 model calls
    plain = generate(model, labels, (3, 8, 8), **heun).images
    assert torch.equal(generate(model, labels, (3, 8, 8), accel=build_policy("ddt_share:schedule=dp,k=6"),
                                **heun).images, plain)


def test_shared_calls_reuse_the_state_as_the_reference_loop(model):
    """sharing_sampling.py's EulerSampler._impl_sampling (``state = None`` on the recompute
    steps, else the last ``s``), restated with flowdit's Euler step, no guidance."""
    labels, steps, recompute = torch.tensor([1, 5]), 6, [0, 2, 3]
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    policy = build_policy("ddt_share:recompute=0/2/3")
    ctx = StepContext(block_policy=policy)
    out = sample(model_velocity(model, labels, ctx=ctx), noise, solver="euler", steps=steps, step_context=ctx).x
    ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x, s = noise.clone(), None
    with torch.no_grad():
        for i in range(steps):
            if i in recompute:
                s = None
            v, s = model.forward_with_state(x, ts[i].float().expand(2), labels, s=s)
            x = x + (ts[i + 1] - ts[i]).float() * v
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    assert policy.stats.full_calls == 3 and policy.stats.calls == 6


def test_dp_schedule_calibrates_through_generate(model):
    policy = build_policy("ddt_share:schedule=dp,k=3")
    generate(model, torch.arange(3), (3, 8, 8), accel=policy, **KW)
    steps = policy.dp_steps
    assert len(steps) == 3 and steps[0] == 0 and policy.similarity.shape == (6, 6)
    assert dp_schedule((1 - policy.similarity).numpy(), 3) == steps
    assert policy.stats.calls == 6 and policy.stats.full_calls == 3  # calibration not counted
    # The same schedule given explicitly gives the same samples.
    a = generate(model, torch.arange(3), (3, 8, 8), accel=policy, **KW).images
    given = build_policy("ddt_share:recompute=" + "/".join(map(str, steps)))
    b = generate(model, torch.arange(3), (3, 8, 8), accel=given, **KW).images
    assert torch.equal(a, b)
    # The reference's K = int(N / state_refresh_rate).
    p2 = build_policy("ddt_share:schedule=dp,interval=2")
    generate(model, torch.arange(2), (3, 8, 8), accel=p2, **KW)
    assert len(p2.dp_steps) == 3


def test_spec_round_trip_and_refusals(model):
    for spec in ("ddt_share:interval=2", "ddt_share:schedule=dp,k=3", "ddt_share:recompute=0/4/7,cfg=split"):
        p = build_policy(spec)
        assert repr(build_policy(repr(p))) == repr(p)
    assert build_policy("ddt_share:recompute=0")._given == (0,)
    with pytest.raises(ConfigError, match="leave interval and k unset"):
        build_policy("ddt_share:recompute=0/2,interval=2")
    with pytest.raises(ConfigError, match="schedule=dp"):
        build_policy("ddt_share:k=3")
    with pytest.raises(ConfigError, match="DiT has no condition encoder"):
        generate(build_model("DiT-tiny", 8, 3, 10), torch.arange(2), (3, 8, 8), accel=build_policy("ddt_share"), **KW)
    with pytest.raises(ConfigError, match="ddt_share"):
        generate(model, torch.arange(2), (3, 8, 8), accel=build_policy("fora"), **KW)
    dp = DDTShare(schedule="dp", k=2)
    ctx = StepContext(block_policy=dp)
    with pytest.raises(ConfigError, match="no schedule yet"):
        sample(model_velocity(model, torch.arange(2), ctx=ctx), torch.randn(2, 3, 8, 8), solver="euler", steps=3,
               step_context=ctx)


# -- a run ---------------------------------------------------------------------------------


def test_trained_run_loads_back_and_samples_with_sharing(tmp_path, capsys):
    from flowdit.cli import main

    args = ["train", "--no-progress", "model.name=DDT-tiny", "train.steps=2", "train.batch_size=16",
            "train.precision=fp32", "train.ckpt_every=2", "optim.warmup_steps=1", "sample.steps=2",
            "sample.solver=euler", "sample.per_class=1", "sample.num_eval=10", f"out_dir={tmp_path}", "name=ddt"]
    assert main(args) == 0
    model, meta = load_run_model(tmp_path / "ddt")
    assert isinstance(model, DDT) and meta["model_class"] == "DDT"
    assert model.config.encoder_depth == 2 and model.config.decoder_depth == 1
    x, t, y = _inputs(2, 1, 8)
    again, _ = load_run_model(tmp_path / "ddt")
    assert torch.equal(model(x, t, y), again(x, t, y))
    capsys.readouterr()
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(tmp_path / "ddt"), "--num", "4", "--solver", "euler", "--steps", "4",
                 "--accel", "ddt_share:schedule=dp,k=2", "--out", str(out), "--no-progress"]) == 0
    assert "2/4 model calls in full" in capsys.readouterr().out
    assert np.load(out)["arr_0"].shape == (4, 8, 8, 1)
