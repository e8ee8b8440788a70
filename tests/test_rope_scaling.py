"""RoPE resolution extrapolation (flowdit.models.rope_scaling and the MMDiT options): each
method against its reference formula restated from the authors' code, factor 1 against
plain RoPE, proportional attention, and Lumina's time shift in flowdit's time."""

import math

import pytest
import torch

from flowdit.core.timesteps import shift_time
from flowdit.errors import ConfigError
from flowdit.models import build_model, text_condition
from flowdit.models.mmdit import image_position_ids, joint_attention, rope_frequencies
from flowdit.models.rope_scaling import (ROPE_SCALINGS, extrapolation_factors, linear_frequencies,
                                         lumina_time, lumina_time_aware_frequencies, lumina_watershed_frequencies,
                                         ntk_frequencies, proportional_attention_scale, scaled_rope_frequencies,
                                         yarn_frequencies, yarn_mscale)

THETA = 10000.0


def _exponents(d):
    return torch.arange(0, d, 2, dtype=torch.float64) / d


# -- reference formulas, restated ---------------------------------------------------------


def _ref_ntk(d, s):
    """whlzy/FiT fit/model/rope.py: find_newbase_ntk -> base * scale ** (dim / (dim - 2)),
    then 1 / new_base ** (arange(0, dim, 2) / dim) ('ntk-aware' in get_1d_rope_freqs)."""
    return 1.0 / (THETA * s ** (d / (d - 2))) ** _exponents(d)


def _ref_yarn(d, s, train_len, beta_fast=32, beta_slow=1):
    """whlzy/FiT fit/model/rope.py, 'yarn' in get_1d_rope_freqs: correction range from
    find_correction_factor, linear_ramp_mask, extrapolated where the mask is 1."""
    def corr(rot):
        return d * math.log(train_len / (rot * 2 * math.pi)) / (2 * math.log(THETA))
    lo, hi = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), d - 1)
    if lo == hi:
        hi += 0.001
    mask = 1 - torch.clamp((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo), 0, 1)
    extra = 1.0 / THETA ** _exponents(d)
    inter = extra / s
    return inter * (1 - mask) + extra * mask


def _ref_lumina_first(head_dim, s, tau):
    """Alpha-VLLM/Lumina-T2X lumina_next_t2i/models/model.py @1ef2b66,
    NextDiT.precompute_freqs_cis(dim, end, theta, scale_factor, timestep): the two-axis head's
    frequencies arange(0, dim, 4)[: dim // 4] / dim, max of interpolation and time-scaled NTK."""
    e = torch.arange(0, head_dim, 4)[: head_dim // 4].double() / head_dim
    inter = 1.0 / THETA ** e / s
    target = tau * head_dim + 1
    timed = 1.0 / (THETA * s ** (head_dim / target)) ** e
    return torch.maximum(inter, timed)


def _ref_lumina_current(head_dim, s, tau, watershed):
    """Same file @9b632c0 (HEAD): linear_factor = s before the watershed, else ntk_factor = s
    (theta * ntk_factor), frequencies divided by linear_factor."""
    linear, ntk = (s, 1.0) if tau < watershed else (1.0, s)
    e = torch.arange(0, head_dim, 4)[: head_dim // 4].double() / head_dim
    return 1.0 / (THETA * ntk) ** e / linear


def _ref_lumina_shift(tau, s):
    """lumina_next_t2i/transport/integrators.py, ode.__init__: t / (t + s - s t) on Lumina's grid."""
    return tau / (tau + s - s * tau)


# -- the per-axis functions ---------------------------------------------------------------


@pytest.mark.parametrize("d", [4, 12, 56])
@pytest.mark.parametrize("s", [1.0, 1.5, 2.0, 4.0])
def test_ntk_and_linear_match_their_formulas(d, s):
    torch.testing.assert_close(ntk_frequencies(d, s), _ref_ntk(d, s), rtol=1e-12, atol=0)
    torch.testing.assert_close(linear_frequencies(d, s), 1.0 / THETA ** _exponents(d) / s, rtol=1e-12, atol=0)
    f = ntk_frequencies(d, s)
    assert f[0] == 1.0 and math.isclose(f[-1], (1.0 / THETA ** _exponents(d))[-1] / s, rel_tol=1e-12)


@pytest.mark.parametrize("d,train_len", [(12, 8), (12, 64), (56, 64), (64, 16)])
@pytest.mark.parametrize("s", [1.0, 2.0, 3.0])
def test_yarn_matches_fit_vision_yarn(d, train_len, s):
    torch.testing.assert_close(yarn_frequencies(d, s, train_len), _ref_yarn(d, s, train_len), rtol=1e-12, atol=0)
    assert yarn_mscale(s) == (1.0 if s <= 1 else 0.1 * math.log(s) + 1.0)  # FiT get_mscale


@pytest.mark.parametrize("d", [12, 56])
@pytest.mark.parametrize("s", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.7, 1.0])
def test_lumina_time_aware_matches_lumina_next(d, s, t):
    tau = 1.0 - t  # flowdit t = 0 data; Lumina tau = 1 data
    torch.testing.assert_close(lumina_time_aware_frequencies(d, s, t), _ref_lumina_first(2 * d, s, tau),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(lumina_watershed_frequencies(d, s, t, watershed=0.3),
                               _ref_lumina_current(2 * d, s, tau, 0.3), rtol=1e-12, atol=0)


def test_lumina_time_aware_ends():
    """Noise end (t = 1): interpolation except w_0; data end (t = 0): at least NTK-like, never below PI."""
    d, s = 12, 4.0
    base = 1.0 / THETA ** _exponents(d)
    noisy = lumina_time_aware_frequencies(d, s, 1.0)
    assert noisy[0] == 1.0
    torch.testing.assert_close(noisy[1:], base[1:] / s, rtol=1e-12, atol=0)
    clean = lumina_time_aware_frequencies(d, s, 0.0)
    assert (clean >= base / s).all() and (clean <= base).all()
    assert torch.equal(lumina_watershed_frequencies(d, s, 0.9), base / s)            # tau = 0.1 < 0.3
    torch.testing.assert_close(lumina_watershed_frequencies(d, s, 0.5), 1.0 / (THETA * s) ** _exponents(d))


def test_extrapolation_factors():
    assert extrapolation_factors("ntk", (16, 8), (8, 8)) == (2.0, 1.0)             # per axis (FiT decouple)
    assert extrapolation_factors("yarn", (4, 24), (8, 8)) == (1.0, 3.0)            # clamped at 1
    s = math.sqrt(16 * 8 / 64)                                                     # Lumina: sqrt of the area ratio
    assert extrapolation_factors("lumina", (16, 8), (8, 8)) == (s, s)
    assert extrapolation_factors("lumina_watershed", (4, 8), (8, 8)) == (1.0, 1.0)


@pytest.mark.parametrize("method", ROPE_SCALINGS)
def test_factor_one_is_plain_rope(method):
    dims = (4, 6, 6)
    ids = torch.cat([torch.zeros(3, 3), image_position_ids(5, 7)])
    plain = rope_frequencies(ids, dims)
    scaled = scaled_rope_frequencies(ids, dims, THETA, method, (1.0, 1.0), (5, 7), t=0.4)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_scaled_rope_leaves_the_index_axis_and_applies_yarn_mscale():
    dims, s = (4, 6, 6), (2.0, 1.5)
    ids = torch.cat([torch.zeros(2, 3), image_position_ids(4, 4)])
    cos, sin = scaled_rope_frequencies(ids, dims, THETA, "yarn", s, (2, 2))
    m = 0.1 * math.log(2.0) + 1
    ang = ids[:, 1].double()[:, None] * _ref_yarn(6, 2.0, 2)[None]
    torch.testing.assert_close(cos[:, 4:10], (m * ang.cos()).repeat_interleave(2, 1).float())
    torch.testing.assert_close(sin[:, 4:10], (m * ang.sin()).repeat_interleave(2, 1).float())
    torch.testing.assert_close(cos[:, :4], torch.full((ids.shape[0], 4), m))       # index ids are all 0


# -- proportional attention and the time shift --------------------------------------------


def test_proportional_attention_scale():
    # Lumina-Next Attention.forward: math.sqrt(math.log(seqlen, base_seqlen) / head_dim)
    assert math.isclose(proportional_attention_scale(1024, 256, 64), math.sqrt(math.log(1024, 256) / 64))
    assert math.isclose(proportional_attention_scale(256, 256, 64), 1 / 8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in range(3))
    scale = proportional_attention_scale(36, 16, 16)
    factor = math.sqrt(math.log(36) / math.log(16))
    torch.testing.assert_close(joint_attention(q, k, v, scale=scale), joint_attention(q * factor, k, v))
    assert torch.equal(joint_attention(q, k, v, scale=None), joint_attention(q, k, v))


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0, 6.0])
def test_lumina_time_shift_is_shift_time(s):
    tau = torch.linspace(0, 1, 11, dtype=torch.float64)       # Lumina's grid, noise (0) to data (1)
    t = lumina_time(tau)                                       # flowdit time
    torch.testing.assert_close(lumina_time(_ref_lumina_shift(tau, s)), shift_time(t, s), rtol=1e-12, atol=1e-15)


# -- the MMDiT options --------------------------------------------------------------------


def _model(**kw):
    torch.manual_seed(0)
    model = build_model("FLUX-tiny", **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _inputs(B=2, H=8, W=8):
    g = torch.Generator().manual_seed(1)
    y = text_condition(torch.randn(B, 3, 24, generator=g), torch.randn(B, 16, generator=g))
    return torch.randn(B, 4, H, W, generator=g), y


@pytest.mark.parametrize("method", ROPE_SCALINGS)
def test_model_at_train_size_is_unchanged(method):
    model = _model()
    x, y = _inputs()
    t = torch.tensor([0.2, 0.8])
    with torch.no_grad():
        ref = model(x, t, y)
        model.set_extrapolation(rope_scaling=method)
        assert torch.equal(model(x, t, y), ref)


def test_model_uses_the_scaled_rope_on_a_larger_grid():
    model = _model(rope_scaling="ntk")
    rope = model._call_positions(8, 4, 3, torch.device("cpu"), torch.zeros(1))
    ids = torch.cat([torch.zeros(3, 3), image_position_ids(8, 4)])
    want = scaled_rope_frequencies(ids, (4, 6, 6), THETA, "ntk", (2.0, 1.0), (4, 4))
    for a, b in zip(rope, want):
        assert torch.equal(a, b)


def test_time_aware_batch_with_different_times_matches_one_by_one():
    model = _model(rope_scaling="lumina", proportional_attn=True)
    x, y = _inputs(H=12, W=8)
    t = torch.tensor([0.1, 0.9])
    with torch.no_grad():
        both = model(x, t, y)
        for i in range(2):
            one = model(x[i:i + 1], t[i:i + 1], {k: v[i:i + 1] for k, v in y.items()})
            torch.testing.assert_close(both[i:i + 1], one, rtol=1e-5, atol=1e-5)


def test_extrapolation_config():
    model = _model()
    assert "rope_scaling" not in model.config_dict() and "proportional_attn" not in model.config_dict()
    model.set_extrapolation(rope_scaling="yarn", rope_train_size=4)
    assert model.config_dict()["rope_scaling"] == "yarn" and model.config.train_grid == (2, 2)
    with pytest.raises(ConfigError):
        model.set_extrapolation(rope_scaling="dynamic")
    with pytest.raises(ConfigError):
        model.set_extrapolation(rope_train_size=3)
    with pytest.raises(ConfigError):
        build_model("MMDiT-tiny", rope_scaling="ntk")  # sin-cos positions


def test_lumina_next_time_shift_is_the_sd3_shift_in_flowdit_time():
    # Restated: Alpha-VLLM/Lumina-T2X lumina_next_t2i/transport/integrators.py, ``ode.__init__``:
    # t = linspace(t0, t1, num_steps); t = t / (t + k - k * t), Lumina time (0 noise, 1 data).
    from flowdit.sampling.schedules import shifted

    for k, n in ((4.0, 30), (6.0, 11), (1.0, 5)):
        lumina = torch.linspace(0, 1, n, dtype=torch.float64)
        lumina = lumina / (lumina + k - k * lumina)
        # num_steps points are num_steps - 1 Euler steps; flowdit's t = 1 - Lumina's.
        torch.testing.assert_close(shifted(n - 1, k, dtype=torch.float64), 1 - lumina, rtol=0, atol=1e-12)
