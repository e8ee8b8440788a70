"""Closed-form checks of flowdit.core: the path, time samplers, losses."""

import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F

from flowdit.core import (
    CosMap,
    LogitNormal,
    ModeSampling,
    Uniform,
    UShaped,
    build_time_sampler,
    eps_from_velocity,
    eps_from_x0,
    expand_t,
    flow_matching_loss,
    interpolate,
    shift_time,
    velocity_from_eps,
    velocity_from_x0,
    velocity_target,
    x0_from_eps,
    x0_from_velocity,
)
from flowdit.errors import ConfigError
from flowdit.sampling import schedules

# ---------------------------------------------------------------------------- path


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    return x0, eps, t


def test_path_endpoints_and_velocity_sign(pair):
    x0, eps, _ = pair
    assert torch.equal(interpolate(x0, eps, 0.0), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, eps, 1.0), eps)  # t = 1 is noise
    assert torch.equal(velocity_target(x0, eps), eps - x0)
    # The target is the time derivative of the path (central difference is exact
    # for a path that is linear in t).
    t, h = 0.3, 1e-3
    dxdt = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(dxdt, velocity_target(x0, eps), rtol=0, atol=1e-10)


def test_expand_t_shapes_and_errors(pair):
    x0, _, t = pair
    assert expand_t(t, x0).shape == (6, 1, 1, 1)
    assert expand_t(0.5, x0).shape == ()
    assert expand_t(torch.tensor(0.5), x0).dtype == x0.dtype
    with pytest.raises(ConfigError, match=r"shape \[B\]"):
        expand_t(torch.rand(5), x0)


def test_converters_round_trip(pair):
    x0, eps, t = pair
    x_t = interpolate(x0, eps, t)
    v = velocity_target(x0, eps)
    close = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_from_velocity(x_t, v, t), x0, **close)
    torch.testing.assert_close(eps_from_velocity(x_t, v, t), eps, **close)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, t), v, **close)
    torch.testing.assert_close(velocity_from_eps(x_t, eps, t), v, **close)
    torch.testing.assert_close(x0_from_eps(x_t, eps, t), x0, **close)
    torch.testing.assert_close(eps_from_x0(x_t, x0, t), eps, **close)
    # x0 -> v -> x0 and eps -> x0 -> eps chains.
    torch.testing.assert_close(x0_from_velocity(x_t, velocity_from_x0(x_t, x0, t), t), x0, **close)
    torch.testing.assert_close(eps_from_x0(x_t, x0_from_eps(x_t, eps, t), t), eps, **close)


def test_converters_clamp_at_singular_ends(pair):
    x0, eps, _ = pair
    zero, one = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    assert torch.isfinite(velocity_from_x0(interpolate(x0, eps, zero) + 1, x0, zero)).all()
    assert torch.isfinite(velocity_from_eps(eps, eps + 1, one)).all()
    assert torch.isfinite(x0_from_eps(eps, eps, one)).all()
    assert torch.isfinite(eps_from_x0(x0, x0, zero)).all()
    # The clamp is |den| >= eps: 1 / eps at the singular point.
    out = velocity_from_x0(x0 + 1, x0, zero, eps=1e-3)
    torch.testing.assert_close(out, torch.full_like(out, 1e3))


# ------------------------------------------------------------------- time samplers

N_SAMPLES = 200_000
GRID = torch.linspace(0.0, 1.0, 20001, dtype=torch.float64)

SAMPLERS = [
    Uniform(),
    LogitNormal(),
    LogitNormal(m=0.5, s=0.7),
    ModeSampling(1.29),
    ModeSampling(-0.5),
    CosMap(),
    UShaped(4.0),
    LogitNormal(shift=3.0),
    UShaped(a=2.0, shift=0.5),
]


def _cdf_on_grid(sampler):
    p = sampler.pdf(GRID)
    dx = GRID[1] - GRID[0]
    steps = torch.cumsum((p[1:] + p[:-1]) / 2 * dx, 0)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), steps])
    return p, cdf


@pytest.mark.parametrize("sampler", SAMPLERS, ids=repr)
def test_time_sampler_matches_pdf(sampler):
    t = sampler.sample(N_SAMPLES, generator=torch.Generator().manual_seed(1))
    assert t.shape == (N_SAMPLES,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 1

    p, cdf = _cdf_on_grid(sampler)
    assert abs(cdf[-1].item() - 1) < 1e-4  # the pdf integrates to 1

    # Kolmogorov-Smirnov statistic against the numerically integrated CDF.
    ts = t.double().sort().values
    model_cdf = torch.from_numpy(
        np.interp(ts.numpy(), GRID.numpy(), cdf.numpy())
    )
    ecdf_hi = torch.arange(1, N_SAMPLES + 1, dtype=torch.float64) / N_SAMPLES
    ecdf_lo = ecdf_hi - 1 / N_SAMPLES
    ks = torch.maximum((ecdf_hi - model_cdf).abs(), (ecdf_lo - model_cdf).abs()).max()
    assert ks < 0.01, ks

    # Mean against the integral of t p(t).
    dx = GRID[1] - GRID[0]
    f = GRID * p
    mean = ((f[1:] + f[:-1]) / 2 * dx).sum().item()
    assert abs(t.double().mean().item() - mean) < 4e-3

    # Histogram counts against the expected counts per bin, within 5 Poisson sigmas.
    edges_idx = torch.arange(0, GRID.numel(), 400)  # 50 bins
    expected = (cdf[edges_idx[1:]] - cdf[edges_idx[:-1]]) * N_SAMPLES
    observed = torch.histc(t.double(), bins=50, min=0.0, max=1.0)
    assert ((observed - expected).abs() <= 5 * expected.sqrt() + 5).all()


def test_time_sampler_is_seeded():
    s = LogitNormal()
    a = s.sample(100, generator=torch.Generator().manual_seed(3))
    b = s.sample(100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_mode_sampling_rejects_non_monotone_scale():
    ModeSampling(2 / (math.pi - 2))  # the boundary is allowed
    ModeSampling(-1.0)
    for bad in (1.8, -1.01, float("nan")):
        with pytest.raises(ConfigError, match="scale"):
            ModeSampling(bad)


def test_build_time_sampler_parses_specs():
    assert isinstance(build_time_sampler("uniform"), Uniform)
    ln = build_time_sampler("logit_normal:m=0.5,s=2")
    assert isinstance(ln, LogitNormal) and (ln.m, ln.s) == (0.5, 2.0)
    assert build_time_sampler("mode:scale=1.29").scale == 1.29
    assert isinstance(build_time_sampler("cosmap"), CosMap)
    assert build_time_sampler("u_shaped:a=4").a == 4.0
    assert build_time_sampler("logit_normal:shift=3").shift == 3.0
    with pytest.raises(ConfigError, match="valid: uniform, logit_normal, mode, cosmap, u_shaped"):
        build_time_sampler("beta:a=1")
    with pytest.raises(ConfigError, match=r"'k'.*valid: m, s, shift"):
        build_time_sampler("logit_normal:k=1")
    with pytest.raises(ConfigError, match="not a number"):
        build_time_sampler("u_shaped:a=four")


# ---------------------------------------------------------------------- time shift


def test_shift_time_properties():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    for s in (0.3, 3.0, 6.0):
        u = shift_time(t, s)
        assert u[0] == 0 and u[-1] == 1
        assert (u.diff() > 0).all()
        torch.testing.assert_close(shift_time(u, 1 / s), t)  # inverse
    assert (shift_time(t, 3.0)[1:-1] > t[1:-1]).all()  # shift > 1 moves toward noise
    # Pinned values of SD3's t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23): another
    # monotone map with the same endpoints and inverse (t ** (1 / s), say) fails here.
    got = shift_time(torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64), 3.0)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.75, 27 / 28], dtype=torch.float64), rtol=0, atol=1e-15)
    assert shift_time(0.5, 0.3) == pytest.approx(0.15 / 0.65, abs=1e-15)
    with pytest.raises(ConfigError, match="shift=0"):
        shift_time(t, 0)


def test_shifted_schedule_uses_shift_time():
    for n, s in ((10, 3.0), (28, 1.0), (7, 0.5)):
        base = schedules.uniform(n, dtype=torch.float64)
        assert torch.equal(schedules.shifted(n, s), shift_time(base, s).float())
        assert torch.equal(schedules.shifted(n, s, dtype=torch.float64), shift_time(base, s))
    # Train time uses the same function: a shifted sampler is the shifted base draw.
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    base = Uniform().sample(1000, generator=g()).double()
    torch.testing.assert_close(
        Uniform(shift=3.0).sample(1000, generator=g()).double(), shift_time(base, 3.0),
        rtol=0, atol=1e-6,
    )


# -------------------------------------------------------------------------- losses


def test_mse_matches_torch():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    loss, per = flow_matching_loss(a, b)
    torch.testing.assert_close(loss, F.mse_loss(a, b))
    torch.testing.assert_close(per, F.mse_loss(a, b, reduction="none").flatten(1).mean(1))


def test_pseudo_huber_exact_values():
    pred = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    target = torch.zeros(2, 2)
    # ||d|| = 5 and c = 12: sqrt(25 + 144) - 12 = 1.
    loss, per = flow_matching_loss(pred, target, kind="huber", huber_c=12.0)
    torch.testing.assert_close(per, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor(0.5))
    # Default c = 0.00054 sqrt(D), D = 2 elements per sample.
    c = 0.00054 * math.sqrt(2)
    _, per = flow_matching_loss(pred, target, kind="huber")
    torch.testing.assert_close(per[0], torch.tensor(math.sqrt(25 + c * c) - c))
    # Limits: ~||d|| for c << ||d||, ~||d||^2 / (2c) for c >> ||d||.
    _, small = flow_matching_loss(pred, target, kind="huber", huber_c=1e-6)
    _, large = flow_matching_loss(pred, target, kind="huber", huber_c=1e4)
    torch.testing.assert_close(small[0], torch.tensor(5.0), rtol=1e-5, atol=0)
    torch.testing.assert_close(large[0], torch.tensor(25 / 2e4), rtol=1e-3, atol=0)


def test_loss_weights_apply_per_sample():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5])
    for kind in ("mse", "huber"):
        _, per = flow_matching_loss(a, b, kind=kind)
        loss_w, per_w = flow_matching_loss(a, b, kind=kind, weight=w)
        torch.testing.assert_close(per_w, per * w)
        torch.testing.assert_close(loss_w, (per * w).mean())
    with pytest.raises(ConfigError, match=r"shape \[B\] = \[4\]"):
        flow_matching_loss(a, b, weight=torch.ones(3))


def test_loss_is_float32_for_half_inputs():
    a = torch.randn(3, 16).bfloat16()
    b = torch.randn(3, 16).bfloat16()
    for kind in ("mse", "huber"):
        loss, per = flow_matching_loss(a, b, kind=kind)
        assert loss.dtype == torch.float32 and per.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = flow_matching_loss(a.float(), b.float())
    assert loss.dtype == torch.float32


def test_loss_bad_input():
    with pytest.raises(ConfigError, match="kind 'l1'"):
        flow_matching_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="l1")
    with pytest.raises(ConfigError, match="does not match"):
        flow_matching_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="huber_c=-1"):
        flow_matching_loss(torch.zeros(2, 3), torch.zeros(2, 3), kind="huber", huber_c=-1)
