"""Public DiT / SiT checkpoints (flowdit.interop.checkpoints) against restatements of the
reference code, on tiny random state dicts in the reference formats.

References restated here (read, not imported; nothing can be downloaded):
- facebookresearch/DiT ``models.py``, class ``DiT`` (``forward``, ``unpatchify``,
  ``TimestepEmbedder.timestep_embedding``, ``DiTBlock``, ``FinalLayer``; timm's
  ``Attention`` and ``Mlp``); willisma/SiT ``models.py``, class ``SiT`` (the same network,
  its ``forward`` keeping the first ``C`` channels when ``learn_sigma``).
- facebookresearch/DiT ``diffusion/gaussian_diffusion.py``: ``get_named_beta_schedule
  ("linear")``, ``ddim_sample`` (eta = 0), ``_predict_xstart_from_eps``; ``diffusion/
  respace.py``: ``space_timesteps``, ``SpacedDiffusion`` (the model is fed the original
  timestep).
- willisma/SiT ``transport/transport.py`` (``Sampler.sample_ode``, ``check_interval``: the
  linear-path velocity ODE integrated over ``linspace(0, 1, num_steps)``) and
  ``transport/integrators.py`` (``ode``: torchdiffeq's fixed-grid Euler on that grid).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowdit.errors import CheckpointError, ConfigError
from flowdit.inference.velocity import model_velocity
from flowdit.interop.checkpoints import (
    DDPMEpsVelocity,
    SiTVelocity,
    ddim_grid,
    ddim_timesteps,
    dit_from_state_dict,
    linear_alphas_cumprod,
    load_dit_checkpoint,
    load_sit_checkpoint,
    read_state_dict,
    split_learned_sigma,
)
from flowdit.sampling.sample import sample

C, P, SIDE, D, DEPTH, HEADS, CLASSES = 4, 2, 8, 32, 2, 2, 5


def reference_state_dict(learn_sigma: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the reference's parameter names and shapes (DiT / SiT models.py)."""
    g = torch.Generator().manual_seed(seed)
    out_c = 2 * C if learn_sigma else C
    n = (SIDE // P) ** 2

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {
        "pos_embed": r(1, n, D, std=0.5),
        "x_embedder.proj.weight": r(D, C, P, P), "x_embedder.proj.bias": r(D),
        "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
        "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
        "y_embedder.embedding_table.weight": r(CLASSES + 1, D, std=0.5),
        "final_layer.linear.weight": r(P * P * out_c, D), "final_layer.linear.bias": r(P * P * out_c),
        "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
            b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
            b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D),
            b + "adaLN_modulation.1.weight": r(6 * D, D), b + "adaLN_modulation.1.bias": r(6 * D),
        })
    return sd


def reference_forward(sd, x, t, y, heads=HEADS):
    """DiT.forward / SiT.forward of the reference models.py (all output channels), restated."""
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)  # noqa: E731
    mod = lambda h, shift, scale: h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # noqa: E731
    # PatchEmbed (timm): conv, flatten(2).transpose(1, 2); fixed pos_embed added.
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    # TimestepEmbedder: [cos, sin] of t * 10000^(-i/half), t fed as given.
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    B, N, _ = h.shape
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sm, cm, gm, sp, cp, gp = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        # timm Attention: qkv.reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4), softmax(q k^T / sqrt(Dh)) v.
        qkv = lin(mod(ln(h), sm, cm), b + "attn.qkv").reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1) @ v
        h = h + gm.unsqueeze(1) * lin(a.transpose(1, 2).reshape(B, N, D), b + "attn.proj")
        m = lin(F.gelu(lin(mod(ln(h), sp, cp), b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + gp.unsqueeze(1) * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(mod(ln(h), shift, scale), "final_layer.linear")
    # unpatchify: reshape (h, w, p, p, c), einsum nhwpqc->nchpwq.
    oc, g = out.shape[-1] // (P * P), SIDE // P
    out = torch.einsum("nhwpqc->nchpwq", out.reshape(B, g, g, P, P, oc))
    return out.reshape(B, oc, SIDE, SIDE)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def inputs(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, C, SIDE, SIDE, generator=g), torch.tensor([0, 3, CLASSES])[:batch]


# ----------------------------------------------------------------------------- weights


def test_imported_dit_equals_reference_forward_eps_and_sigma_channels():
    sd = reference_state_dict(learn_sigma=True)
    x, y = inputs()
    tau = torch.tensor([0.0, 417.0, 999.0])
    ref = reference_forward(sd, x, tau, y)
    eps_net = dit_from_state_dict(sd, num_heads=HEADS)
    sig_net = dit_from_state_dict(sd, num_heads=HEADS, output="sigma")
    assert eps_net.learn_sigma and eps_net.config.time_scale == 1.0
    assert (eps_net.config.input_size, eps_net.config.depth, eps_net.config.num_classes) == (SIDE, DEPTH, CLASSES)
    with torch.no_grad():
        assert rel(eps_net(x, tau, y), ref[:, :C]) < 1e-5
        assert rel(sig_net(x, tau, y), ref[:, C:]) < 1e-5
    # The sigma channels interleave every 2C rows; taking the last half of the rows is wrong.
    w, b = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]
    naive = dict(sd, **{"final_layer.linear.weight": w[: w.shape[0] // 2], "final_layer.linear.bias": b[: b.shape[0] // 2]})
    with torch.no_grad():
        assert rel(dit_from_state_dict(naive, num_heads=HEADS)(x, tau, y), ref[:, :C]) > 0.1


def test_split_learned_sigma_row_order():
    p, c = 2, 3
    rows = torch.arange(p * p * 2 * c, dtype=torch.float32)  # row (i p + j) 2C + ch
    ew, eb, sw, sb = split_learned_sigma(rows[:, None].repeat(1, 2), rows, c, p)
    expect_eps = [pix * 2 * c + ch for pix in range(p * p) for ch in range(c)]
    assert eb.tolist() == expect_eps and ew[:, 0].tolist() == expect_eps
    assert sb.tolist() == [v + c for v in expect_eps]


def test_default_heads_and_refusals():
    sd = reference_state_dict()
    with pytest.raises(ConfigError, match="cannot be read from the weights, pass num_heads"):
        dit_from_state_dict(sd)
    bad = dict(sd, extra=torch.zeros(1))
    del bad["blocks.1.attn.proj.bias"]
    with pytest.raises(ConfigError) as e:
        dit_from_state_dict(bad, num_heads=HEADS)
    msg = str(e.value)
    assert "\n" not in msg and "missing blocks.1.attn.proj.bias" in msg and "unexpected extra" in msg
    with pytest.raises(ConfigError, match="not a DiT/SiT state dict, missing keys: pos_embed"):
        dit_from_state_dict({k: v for k, v in sd.items() if k != "pos_embed"}, num_heads=HEADS)
    with pytest.raises(ConfigError, match="null class"):
        dit_from_state_dict(sd, num_heads=HEADS, num_classes=CLASSES + 1)
    with pytest.raises(ConfigError, match="output='sigma' needs a learned-sigma"):
        dit_from_state_dict(reference_state_dict(learn_sigma=False), num_heads=HEADS, output="sigma")
    # The public sizes take their heads from the table (DiT-S: hidden 384, 6 heads).
    from flowdit.interop.checkpoints import DIT_NUM_HEADS
    assert DIT_NUM_HEADS[1152] == 16 and DIT_NUM_HEADS[384] == 6


# ----------------------------------------------------------------------------- files


def test_files_ema_plain_and_refusals(tmp_path):
    sd = reference_state_dict(seed=0)
    other = reference_state_dict(seed=5)
    x, y = inputs(batch=2)
    t = torch.tensor([0.5, 0.3])
    plain = tmp_path / "plain.pth"
    torch.save(sd, plain)
    wrapped = tmp_path / "train.pt"
    torch.save({"model": other, "ema": sd, "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")}, wrapped)
    a, b = load_dit_checkpoint(plain, num_heads=HEADS), load_dit_checkpoint(wrapped, num_heads=HEADS)
    assert "'ema' weights" in b.source and b.source.startswith(str(wrapped))
    with torch.no_grad():
        assert torch.equal(a(x, t, y), b(x, t, y))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint" * 10)
    with pytest.raises(CheckpointError) as e:
        load_dit_checkpoint(corrupt, num_heads=HEADS)
    assert str(corrupt) in str(e.value) and "\n" not in str(e.value)
    notdict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), notdict)
    with pytest.raises(CheckpointError, match=f"{notdict}: expected a state dict"):
        read_state_dict(notdict)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_state_dict(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="expected a .pt or .pth"):
        read_state_dict(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="non-tensor entries: step"):
        read_state_dict(dict(sd, step=3))


# ----------------------------------------------------------------------------- DDPM time


def test_schedule_and_respacing_match_the_reference():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    assert torch.allclose(linear_alphas_cumprod(), torch.from_numpy(np.cumprod(1 - betas)), rtol=0, atol=0)

    def space_timesteps(n, count):  # respace.py, one section
        frac = (n - 1) / (count - 1) if count > 1 else 1
        cur, out = 0.0, []
        for _ in range(count):
            out.append(round(cur))
            cur += frac
        return sorted(set(out))

    for steps in (1, 2, 10, 25, 50, 250, 1000):
        assert ddim_timesteps(steps) == space_timesteps(1000, steps)
    assert ddim_timesteps(250)[:3] == [0, 4, 8] and ddim_timesteps(250)[-1] == 999


def test_time_mapping_range_and_integer_steps():
    net = dit_from_state_dict(reference_state_dict(), num_heads=HEADS)
    model = DDPMEpsVelocity(net)
    abar = linear_alphas_cumprod()
    lo, hi = model.t_range
    assert 0.0098 < lo < 0.0101 and 0.993 < hi < 0.9940
    taus = torch.arange(1000)
    times = model._times
    for dtype in (torch.float32, torch.float64):
        tau, alpha, sigma = model.ddpm_coordinates(times.to(dtype))
        assert torch.equal(tau, taus.double())
        assert torch.equal(alpha, abar.sqrt()) and torch.equal(sigma, (1 - abar).sqrt())
    mid = ((times[:-1] + times[1:]) / 2)
    tau, alpha, sigma = model.ddpm_coordinates(mid)
    assert ((tau > taus[:-1]) & (tau < taus[1:])).all() and (tau.diff() > 0).all()
    assert torch.allclose(sigma / (alpha + sigma), mid) and torch.allclose(alpha**2 + sigma**2, torch.ones(999).double())
    tau, alpha, sigma = model.ddpm_coordinates(torch.tensor([0.0, lo / 2]))
    assert tau.tolist() == [0.0, 0.0] and alpha[0] == 1 and sigma[0] == 0
    x, y = inputs(batch=2)
    with pytest.raises(ConfigError, match="outside the DDPM model's range"):
        model(x, torch.tensor([0.5, 1.0]), y)
    with torch.no_grad():
        assert torch.isfinite(model(x, torch.zeros(2), y)).all()
        # v = eps_hat - x0_hat is flowdit's eps -> v converter (eps - x_t) / (1 - t).
        t = torch.tensor([0.3, 0.9])
        tau, alpha, sigma = model.ddpm_coordinates(t)
        eps = net(x * (alpha + sigma).float().view(-1, 1, 1, 1), tau.float(), y)
        assert rel(model(x, t, y), (eps - x) / (1 - t.view(-1, 1, 1, 1))) < 1e-5


def reference_ddim(sd, z, y, steps, cfg_scale=1.0, guide_channels=C):
    """DDIM (eta = 0, clip_denoised=False) on the respaced schedule, as gaussian_diffusion.py
    ddim_sample: x0 = sqrt(1/abar) x - sqrt(1/abar - 1) eps; x <- sqrt(abar_prev) x0 +
    sqrt(1 - abar_prev) eps. With guidance the model is run on [x; x] with [y; null] and
    eps = eps_u + s (eps_c - eps_u) on the first ``guide_channels`` channels (the public
    forward_with_cfg uses 3; the others keep the conditional eps)."""
    abar = linear_alphas_cumprod()
    kept = ddim_timesteps(steps)
    x = z.clone()
    for i in reversed(range(len(kept))):
        tau = kept[i]
        a, a_prev = float(abar[tau]), (float(abar[kept[i - 1]]) if i > 0 else 1.0)
        tt = torch.full((x.shape[0],), float(tau))
        if cfg_scale == 1.0:
            eps = reference_forward(sd, x, tt, y)[:, :C]
        else:
            out = reference_forward(sd, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, CLASSES)]))[:, :C]
            cond, unc = out.chunk(2)
            eps = cond.clone()
            eps[:, :guide_channels] = unc[:, :guide_channels] + cfg_scale * (cond[:, :guide_channels] - unc[:, :guide_channels])
        x0 = math.sqrt(1 / a) * x - math.sqrt(1 / a - 1) * eps
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_flowdit_euler_on_ddim_grid_equals_reference_ddim(cfg_scale):
    sd = reference_state_dict(learn_sigma=True, seed=2)
    model = DDPMEpsVelocity(dit_from_state_dict(sd, num_heads=HEADS))
    z, _ = inputs(seed=3, batch=2)
    y = torch.tensor([1, 4])
    steps = 8
    with torch.no_grad():
        ref = reference_ddim(sd, z, y, steps, cfg_scale)
        grid = ddim_grid(steps)
        fn = model_velocity(model, y, cfg_scale=cfg_scale)
        out = sample(fn, z * grid.noise_scale, solver="euler", schedule=grid.times).x
    assert grid.times[0] == model.t_range[1] and grid.times[-1] == 0 and grid.timesteps[0] == 999
    assert rel(out, ref) < 1e-5
    if cfg_scale != 1.0:
        # The public forward_with_cfg guides only the first 3 of the 4 latent channels; flowdit
        # guides all of them (the standard formulation), so the two samplers then differ.
        with torch.no_grad():
            three = reference_ddim(sd, z, y, steps, cfg_scale, guide_channels=3)
        assert rel(out, three) > 1e-3


# ----------------------------------------------------------------------------- SiT


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_sit_wrapper_equals_reference_forward(learn_sigma, tmp_path):
    sd = reference_state_dict(learn_sigma=learn_sigma, seed=4)
    path = tmp_path / "sit.pt"
    torch.save(sd, path)
    model = load_sit_checkpoint(path, num_heads=HEADS)
    assert isinstance(model, SiTVelocity) and model.learn_sigma == learn_sigma and model.null_class == CLASSES
    x, y = inputs(seed=6)
    s = torch.tensor([0.0, 0.37, 1.0])  # SiT's time: 0 noise, 1 data, fed unscaled
    with torch.no_grad():
        ref = reference_forward(sd, x, s, y)[:, :C]  # SiT.forward drops the sigma half by chunk(2, dim=1)
        assert rel(model(x, 1 - s, y), -ref) < 1e-5


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_flowdit_euler_equals_sit_euler_ode(cfg_scale):
    sd = reference_state_dict(learn_sigma=False, seed=7)
    model = load_sit_checkpoint(sd, num_heads=HEADS)
    z, _ = inputs(seed=8, batch=2)
    y = torch.tensor([0, 2])
    num_steps = 9  # SiT's num_steps is the number of grid points
    s_grid = torch.linspace(0, 1, num_steps)
    x = z.clone()
    with torch.no_grad():
        for i in range(num_steps - 1):  # torchdiffeq euler: x += (s_{i+1} - s_i) f(s_i, x)
            s = torch.full((2,), float(s_grid[i]))
            if cfg_scale == 1.0:
                v = reference_forward(sd, x, s, y)[:, :C]
            else:
                out = reference_forward(sd, torch.cat([x, x]), torch.cat([s, s]), torch.cat([y, torch.full_like(y, CLASSES)]))[:, :C]
                cond, unc = out.chunk(2)
                v = unc + cfg_scale * (cond - unc)
            x = x + (s_grid[i + 1] - s_grid[i]) * v
        fn = model_velocity(model, y, cfg_scale=cfg_scale)
        out = sample(fn, z, solver="euler", schedule=1 - torch.linspace(0, 1, num_steps, dtype=torch.float64)).x
    assert rel(out, x) < 1e-5
