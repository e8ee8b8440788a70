"""Coupling pairs, straightness and one reflow round on a toy 2D problem."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from flowdit.core.timesteps import build_time_sampler
from flowdit.distill import load_pairs, reflow_loss, straightness, transport_cost, write_pairs
from flowdit.errors import ConfigError, DataError
from flowdit.sampling.sample import sample


# -- straightness against closed forms ------------------------------------------------------


def test_a_straight_flow_has_zero_straightness():
    c = torch.tensor([[1.5, -0.5]])
    res = straightness(lambda x, t: c.expand_as(x), torch.randn(8, 2), steps=8)
    assert res.straightness == pytest.approx(0.0, abs=1e-10)
    assert res.transport_cost == pytest.approx(float(c.pow(2).mean()), rel=1e-6)


def test_straightness_of_the_exponential_flow_matches_its_closed_form():
    # dx/dt = x from t = 1 to 0: z_t = z_1 e^(t - 1), z_0 = z_1 / e. With c = 1 - 1/e,
    # S = E[z_1^2] int_0^1 (c - e^(t-1))^2 dt = (1 - e^-2) / 2 - c^2 per dimension.
    z1 = torch.randn(4096, 3, dtype=torch.float64)
    c = 1 - math.exp(-1)
    exact = ((1 - math.exp(-2)) / 2 - c**2) * float(z1.pow(2).mean())
    res = straightness(lambda x, t: x, z1, solver="rf3", steps=200)
    assert res.straightness == pytest.approx(exact, rel=1e-4)
    assert res.transport_cost == pytest.approx(c**2 * float(z1.pow(2).mean()), rel=1e-6)


def test_transport_cost_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        transport_cost(torch.zeros(2, 3), torch.zeros(2, 4))


# -- pairs: deterministic, resumable, verified ----------------------------------------------


def _affine_sampler(noise, labels):
    return 0.5 * noise + (0 if labels is None else labels.view(-1, *[1] * (noise.dim() - 1)).float())


def test_pairs_are_deterministic_and_independent_of_sharding(tmp_path):
    a = write_pairs(tmp_path / "a", 23, (1, 2, 2), _affine_sampler, num_classes=3, seed=5, shard_size=10,
                    progress=False)
    b = write_pairs(tmp_path / "b", 23, (1, 2, 2), _affine_sampler, num_classes=3, seed=5, shard_size=4,
                    batch_size=3, progress=False)
    pa, pb = load_pairs(a.parent), load_pairs(b.parent)
    assert len(pa) == 23 and torch.equal(pa.noise, pb.noise) and torch.equal(pa.sample, pb.sample)
    assert torch.equal(pa.label, torch.arange(23) % 3)
    assert torch.equal(pa.sample, _affine_sampler(pa.noise, pa.label))
    c = write_pairs(tmp_path / "c", 23, (1, 2, 2), _affine_sampler, num_classes=3, seed=6, shard_size=10,
                    progress=False)
    assert not torch.equal(load_pairs(c.parent).noise, pa.noise)


def test_pairs_resume_without_duplicating_or_dropping(tmp_path):
    out = tmp_path / "p"
    calls = []

    def counting(noise, labels):
        calls.append(len(noise))
        return _affine_sampler(noise, labels)

    # Two "processes" of three: ranks 0 and 2 finish, rank 1 is killed before it starts.
    for rank in (0, 2):
        write_pairs(out, 50, (2,), counting, num_classes=None, shard_size=8, rank=rank, world_size=3,
                    progress=False)
    with pytest.raises(DataError, match="not complete"):
        load_pairs(out)
    done_before = sum(calls)
    # A shard that a killed writer left corrupt is redone; the finished ones are kept.
    (out / "shard_00000.safetensors").write_bytes(b"garbage")
    calls.clear()
    write_pairs(out, 50, (2,), counting, num_classes=None, shard_size=8, progress=False)
    assert sum(calls) == 50 - done_before + 8
    pairs = load_pairs(out)
    assert len(pairs) == 50 and pairs.label is None
    fresh = write_pairs(tmp_path / "fresh", 50, (2,), _affine_sampler, num_classes=None, shard_size=8,
                        progress=False)
    assert torch.equal(load_pairs(fresh.parent).sample, pairs.sample)
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_pairs_refuse_other_settings_and_corrupt_shards(tmp_path):
    out = tmp_path / "p"
    write_pairs(out, 10, (2,), _affine_sampler, num_classes=None, shard_size=5, settings={"nfe": 8},
                progress=False)
    with pytest.raises(ConfigError, match="settings"):
        write_pairs(out, 10, (2,), _affine_sampler, num_classes=None, shard_size=5, settings={"nfe": 16},
                    progress=False)
    blob = bytearray((out / "shard_00001.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (out / "shard_00001.safetensors").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="checksum"):
        load_pairs(out)
    with pytest.raises(DataError, match="not a pair directory"):
        load_pairs(tmp_path)


# -- one reflow round on two Gaussians ------------------------------------------------------


class ToyVelocity(nn.Module):
    """A small MLP ``v(x, t)`` on 2D points."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 2))

    def forward(self, x, t, cond=None):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], 1))


def _fit(model, draw, steps, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sampler = build_time_sampler("uniform")
    for _ in range(steps):
        z0, z1 = draw(g)
        loss, _ = reflow_loss(model, z0, z1, sampler.sample(len(z0), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _one_step_error(model, z1):
    """Mean squared distance per dimension between the 1-step Euler sample and the 64-step one."""
    with torch.no_grad():
        fn = lambda x, t: model(x, t)  # noqa: E731
        one = sample(fn, z1, solver="euler", steps=1).x
        many = sample(fn, z1, solver="rf2", steps=32).x
    return float((one - many).pow(2).mean())


def test_one_reflow_round_straightens_two_gaussians(tmp_path):
    torch.manual_seed(0)
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])

    def data(g, n=512):
        k = torch.randint(0, 2, (n,), generator=g)
        return centers[k] + 0.3 * torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)

    rf1 = _fit(ToyVelocity(), data, 1500, seed=1)
    v1 = lambda x, t: rf1(x, t)  # noqa: E731
    out = write_pairs(tmp_path / "pairs", 4096, (2,), lambda z, _: sample(v1, z, solver="rf2", steps=32).x,
                      num_classes=None, seed=3, progress=False)
    pairs = load_pairs(out.parent)

    def coupled(g, n=512):
        i = torch.randint(0, len(pairs), (n,), generator=g)
        return pairs.sample[i], pairs.noise[i]

    import copy

    rf2 = _fit(copy.deepcopy(rf1), coupled, 1500, seed=2)
    z = torch.randn(2048, 2, generator=torch.Generator().manual_seed(9))
    s1 = straightness(v1, z, steps=32).straightness
    s2 = straightness(lambda x, t: rf2(x, t), z, steps=32).straightness
    e1, e2 = _one_step_error(rf1, z), _one_step_error(rf2, z)
    # Measured on this problem (seeded, torch 2.13 CPU): S 0.57 -> 0.0016 and 1-step error
    # 2.27 -> 0.024, ratios of about 0.003 and 0.01; asserted at 0.1, a 10x margin.
    assert s2 < 0.1 * s1, (s1, s2)
    assert e2 < 0.1 * e1, (e1, e2)
    # The 2-RF samples still cover both modes.
    with torch.no_grad():
        x = sample(lambda x, t: rf2(x, t), z, solver="euler", steps=1).x
    assert 0.35 < float((x[:, 0] > 0).float().mean()) < 0.65


# -- the command line -----------------------------------------------------------------------


def test_reflow_pairs_cli_writes_loadable_pairs(tmp_path, capsys):
    from flowdit.cli import main

    tiny = ["model.name=DiT-tiny", "train.batch_size=16", "train.precision=fp32", "train.steps=2",
            "train.ckpt_every=2", f"out_dir={tmp_path}", "name=t", "sample.num_eval=10", "sample.per_class=1"]
    assert main(["train", "--no-progress", "--no-outputs", "--config", "configs/digits.yaml", *tiny]) == 0
    args = ["reflow", "pairs", "--ckpt", str(tmp_path / "t"), "--num", "12", "--out", str(tmp_path / "pairs"),
            "--steps", "2", "--shard-size", "5", "--precision", "fp32", "--no-progress"]
    assert main(args) == 0
    pairs = load_pairs(tmp_path / "pairs")
    assert pairs.sample.shape == (12, 1, 8, 8) and torch.equal(pairs.label, torch.arange(12) % 10)
    assert pairs.settings["solver"] == "rf2" and pairs.settings["steps"] == 2
    other = [("3" if a == "2" and args[i - 1] == "--steps" else a) for i, a in enumerate(args)]
    assert main(other) == 2  # other settings, same directory
    assert "other settings" in capsys.readouterr().err


def test_reflow_trains_on_the_pairs_through_the_core_trainer(tmp_path):
    """A reflow run starts from its teacher's EMA weights and regresses exactly the pairs' straight lines."""
    from flowdit.cli import main
    from flowdit.train.config import RunConfig
    from flowdit.train.run import load_run_model
    from flowdit.train.trainer import Trainer
    from flowdit.utils.config import load_config

    tiny = ["model.name=DiT-tiny", "train.batch_size=16", "train.precision=fp32", "train.steps=2",
            "train.ckpt_every=2", f"out_dir={tmp_path}", "flow.label_dropout=0"]
    assert main(["train", "--no-progress", "--no-outputs", *tiny, "name=teacher"]) == 0
    assert main(["reflow", "pairs", "--ckpt", str(tmp_path / "teacher"), "-n", "40", "--out",
                 str(tmp_path / "pairs"), "--steps", "2", "--precision", "fp32", "--no-progress"]) == 0
    cfg = load_config(RunConfig, None, tiny + ["name=student", f"data.pairs={tmp_path / 'pairs'}",
                                               f"train.init_from={tmp_path / 'teacher'}"])
    tr = Trainer(cfg, progress=False)
    teacher, _ = load_run_model(tmp_path / "teacher")
    for a, b in zip(tr.model.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)
    x0, y, eps, _, idx = tr.draw(0)
    pairs = load_pairs(tmp_path / "pairs")
    assert torch.equal(x0, pairs.sample[idx]) and torch.equal(eps, pairs.noise[idx])
    assert torch.equal(y, pairs.label[idx])
    tr.fit()
    bad = load_config(RunConfig, None, tiny + ["name=s2", f"data.pairs={tmp_path}"])
    with pytest.raises(DataError, match="not a pair directory"):
        Trainer(bad, progress=False)


# -- 2-rectified flow++: loss and few-step sampler -------------------------------------------

from flowdit.core.losses import flow_matching_loss  # noqa: E402
from flowdit.core.path import interpolate  # noqa: E402
from flowdit.distill import (  # noqa: E402
    FeatureDistance,
    Renoise,
    anneal_randomness,
    distill_times,
    distillation_loss,
    flow_guided_target,
    joint_flip,
    mix_noise,
    rfpp_loss,
)


def _sq_dist(a, b):
    """A stand-in perceptual distance ``[B]``."""
    return (a - b).pow(2).flatten(1).mean(1)


def _rfpp_case(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, 1, 4, 4, generator=g), torch.randn(b, 1, 4, 4, generator=g)
    v = torch.randn(b, 1, 4, 4, generator=g)
    return x0, eps, v


def test_rfpp_loss_reduces_to_plain_mse_when_its_options_are_off():
    x0, eps, v = _rfpp_case()
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    xt = interpolate(x0, eps, t)
    plain, per = flow_matching_loss(v, eps - x0)
    loss, per_rfpp = rfpp_loss(v, xt, x0, eps, t, perceptual=None, huber=False, time_weight=False)
    assert torch.allclose(per_rfpp, per) and torch.allclose(loss, plain)
    assert torch.allclose(reflow_loss(lambda x, tt, c: v, x0, eps, t)[0], loss)
    # pseudo-Huber with a huge c is ||d||^2 / (2c): times 2c it is the squared error (summed, /D here).
    c = 1e6
    _, per_h = rfpp_loss(v, xt, x0, eps, t, huber_c=c, time_weight=False)
    assert torch.allclose(per_h * 2 * c, per, rtol=1e-4)


def test_rfpp_loss_matches_the_reference_formula_at_given_times():
    # The 2-RF++ code's loss ('lpips-huber' with --lpips_divt), written in its own variables:
    # x data, z noise, zt = (1 - t) x + t z, target z - x, pred_x = zt - t pred. Its time runs
    # from data (0) to noise (1) like flowdit's, so the conversion is the identity.
    x, z, pred = _rfpp_case(1)
    t = torch.tensor([1e-3, 0.25, 0.5, 0.9])
    D = x[0].numel()
    zt = (1 - t).view(-1, 1, 1, 1) * x + t.view(-1, 1, 1, 1) * z
    c_ref = 0.00054 * D
    huber = (torch.sqrt(((pred - (z - x)) ** 2).sum((1, 2, 3)) + c_ref**2) - c_ref) / D
    pred_x = zt - pred * t.view(-1, 1, 1, 1)
    reference = (1 - t) * huber + _sq_dist(pred_x, x) / t
    loss, per = rfpp_loss(pred, interpolate(x, z, t), x, z, t, perceptual=_sq_dist)
    assert torch.allclose(per, reference, rtol=1e-5)
    assert loss.item() == pytest.approx(reference.mean().item(), rel=1e-5)
    # Weight 0 at the noise end for the velocity term; 1/t is bounded at t = 0.
    _, per0 = rfpp_loss(pred, interpolate(x, z, torch.zeros(4)), x, z, torch.zeros(4), perceptual=_sq_dist)
    assert torch.isfinite(per0).all()


def _renoise_by_hand(field, z, ts):
    x = z
    for a, b in zip(ts[:-1], ts[1:]):
        x0_hat = x - a * field(x, torch.full((len(x),), a))
        x = (1 - b) * x0_hat + b * z
    return x


def test_renoise_sampler_recovers_a_straight_endpoint_in_one_step_and_reuses_the_initial_noise():
    a = torch.tensor([[0.5, -2.0, 1.0]])
    straight = lambda x, t: (x - a) / t[:, None]  # noqa: E731  (the field of the lines z -> a)
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    one = sample(straight, z, solver="renoise", steps=1)
    assert one.nfe == 1 and torch.allclose(one.x, a.expand_as(z), atol=1e-6)
    assert torch.allclose(sample(straight, z, solver=Renoise(), steps=3).x, a.expand_as(z), atol=1e-5)
    # On a curved field it re-noises with the initial z, unlike Euler.
    curved = lambda x, t: torch.sin(x) + t[:, None]  # noqa: E731
    res = sample(curved, z, solver="renoise", steps=3, schedule="uniform")
    assert torch.allclose(res.x, _renoise_by_hand(curved, z, [1.0, 2 / 3, 1 / 3, 0.0]), atol=1e-5)
    assert not torch.allclose(res.x, sample(curved, z, solver="euler", steps=3, schedule="uniform").x, atol=1e-3)
    # At two steps it is Euler: the last step lands at t = 0, where z has no weight.
    two = sample(curved, z, solver="renoise", steps=2, schedule="uniform").x
    assert torch.allclose(two, sample(curved, z, solver="euler", steps=2, schedule="uniform").x, atol=1e-6)


# -- SlimFlow ---------------------------------------------------------------------------------


def test_slimflow_noise_mix_keeps_unit_variance_and_its_ends():
    g = torch.Generator().manual_seed(0)
    zp, fresh = torch.randn(200_000, generator=g), torch.randn(200_000, generator=g)
    for b in (0.0, 0.3, 0.8, 1.0):
        assert float(mix_noise(zp, fresh, b).var()) == pytest.approx(1.0, abs=0.01)
    assert torch.equal(mix_noise(zp, fresh, 0.0), zp) and torch.equal(mix_noise(zp, fresh, 1.0), fresh)
    with pytest.raises(ConfigError):
        mix_noise(zp, fresh, 1.5)
    # Annealing: linear (their default) 1 -> 0 over N steps, then 0; cos and exp start at 1.
    assert [anneal_randomness(s, 10) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    assert anneal_randomness(0, 10, "cos") == 1.0 and anneal_randomness(10, 10, "cos") == pytest.approx(0.0)
    assert anneal_randomness(10, 10, "exp") == pytest.approx(math.exp(-1))
    assert anneal_randomness(3, 0) == 0.0


def test_slimflow_flip_is_joint():
    x0 = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    z = -x0
    fx, fz = joint_flip(x0, z, torch.tensor([True, False]))
    assert torch.equal(fx[0], x0[0].flip(-1)) and torch.equal(fz[0], z[0].flip(-1))
    assert torch.equal(fx[1], x0[1]) and torch.equal(fz[1], z[1])
    assert torch.equal(fz, -fx)  # the pair stays a pair


def test_flow_guided_target_matches_slimflow_convention():
    # SlimFlow's code: noise at t = 0, data at t = 1, velocity data - noise. With a flowdit
    # teacher v(x, t), theirs is -v(x, 1 - t). Their target (teacher_loss_new): from the
    # student's one-step velocity p, x_t = noise + t p, then x_1 = x_t + (1 - t) v_theirs(x_t, t).
    g = torch.Generator().manual_seed(3)
    noise, x0_student = torch.randn(5, 1, 3, 3, generator=g), torch.randn(5, 1, 3, 3, generator=g)
    teacher = lambda x, t: torch.tanh(x) * t.view(-1, 1, 1, 1) + 0.3  # noqa: E731  (flowdit convention)
    theirs = lambda x, t: -teacher(x, 1 - t)  # noqa: E731
    t_theirs = torch.rand(5, generator=g) * 0.6 + 0.2
    p = x0_student - noise
    xt = noise + t_theirs.view(-1, 1, 1, 1) * p
    x1 = xt + (1 - t_theirs).view(-1, 1, 1, 1) * theirs(xt, t_theirs)
    ours = flow_guided_target(teacher, noise, x0_student, 1 - t_theirs)
    assert torch.allclose(ours, x1, atol=1e-6)


# -- k-step and one-step distillation ---------------------------------------------------------


def test_distill_times_are_the_euler_grid():
    u = torch.linspace(0, 0.999, 1000)
    assert set(distill_times(4, u).tolist()) == {1.0, 0.75, 0.5, 0.25}
    assert torch.equal(distill_times(1, u), torch.ones(1000))
    with pytest.raises(ConfigError):
        distill_times(0, u)


def test_distillation_loss_is_zero_for_the_teachers_exact_endpoint_map():
    # Teacher endpoint map T(z) = A z + c (elementwise). A student that knows the chord
    # through (z, T(z)) has v(x, t) = z - T(z) with z solved from x = (1 - t) T(z) + t z.
    A, c = 0.5, 0.25
    T = lambda z: A * z + c  # noqa: E731

    def student(x, t):
        tt = t.view(-1, 1, 1, 1)
        z = (x - (1 - tt) * c) / ((1 - tt) * A + tt)
        return z - T(z)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1), nn.GELU())
    perceptual = FeatureDistance(net, forward=net)
    z = torch.randn(8, 1, 6, 6)
    for k in (1, 4):
        t = distill_times(k, torch.rand(8))
        xt = interpolate(T(z), z, t)
        for kind in ("mse", "huber", "perceptual"):
            loss, per = distillation_loss(student(xt, t), xt, T(z), z, t, kind=kind, perceptual=perceptual)
            assert float(per.abs().max()) < 1e-6, (k, kind)
        wrong, _ = distillation_loss(student(xt, t) + 0.1, xt, T(z), z, t, kind="perceptual", perceptual=perceptual)
        assert wrong > 1e-4
    # k Euler steps of that student land on the teacher's endpoint.
    fn = lambda x, t: student(x.view(-1, 1, 6, 6), t).view(len(x), -1)  # noqa: E731
    assert torch.allclose(sample(fn, z.view(8, -1), solver="euler", steps=4, schedule="uniform").x,
                          T(z).view(8, -1), atol=1e-5)


def test_guide_feature_distance_is_a_differentiable_distance():
    from flowdit.eval.evaluator import load_classifier

    guide, _ = load_classifier("digits", "guide")
    d = FeatureDistance(guide)
    assert len(d.taps) == 4
    a = torch.rand(3, 1, 8, 8) * 2 - 1
    b = (a + 0.2 * torch.randn_like(a)).requires_grad_(True)
    assert torch.allclose(d(a, a), torch.zeros(3), atol=1e-10)
    dist = d(b, a)
    assert (dist > 0).all()
    dist.sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in guide.parameters())
    # A fixed target takes the no-autograd path: the same distance and the same gradient
    # as when both sides are differentiated together.
    a2 = a.clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True)
    both = d(b2, a2)
    both.sum().backward()
    assert torch.allclose(both, dist.detach(), atol=1e-6)
    assert torch.allclose(b2.grad, b.grad, atol=1e-6) and a2.grad.abs().sum() > 0


# -- configuration and the core trainer ------------------------------------------------------


def test_distill_config_round_trip_and_clear_errors(tmp_path):
    from flowdit.train.config import RunConfig
    from flowdit.utils.config import from_dict, load_config, to_dict

    keys = ["data.pairs=p", "flow.loss=rfpp", "flow.time_sampler=u_shaped:a=4", "flow.perceptual_weight=0.5"]
    cfg = load_config(RunConfig, None, keys)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg and cfg.flow.loss == "rfpp"
    slim = load_config(RunConfig, None, ["data.pairs=p", "distill.steps=1", "distill.loss=perceptual",
                                         "distill.teacher=runs/x", "distill.anneal_steps=10", "distill.flip=true"])
    assert from_dict(RunConfig, to_dict(slim)) == slim and slim.distill.flip
    bad = {
        "distill.loss=lpips2": "distill.loss",
        "flow.perceptual=evaluator": "flow.perceptual",
        "distill.steps=-1": "distill.steps",
        "distill.teacher=runs/x": "one-step",
        "distill.anneal_schedule=square": "distill.anneal_schedule",
    }
    for override, msg in bad.items():
        with pytest.raises(ConfigError, match=msg):
            load_config(RunConfig, None, ["data.pairs=p", override])
    with pytest.raises(ConfigError, match="data.pairs"):
        load_config(RunConfig, None, ["distill.steps=1"])
    with pytest.raises(ConfigError, match="rfpp"):
        load_config(RunConfig, None, ["flow.loss=rfpp"])


TINY_D = ["model.name=DiT-tiny", "train.batch_size=8", "train.precision=fp32", "train.ckpt_every=100",
          "flow.label_dropout=0", "optim.warmup_steps=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def teacher_and_pairs(tmp_path_factory):
    from flowdit.cli import main

    root = tmp_path_factory.mktemp("distill")
    assert main(["train", "--no-progress", "--no-outputs", *TINY_D, "train.steps=2", f"out_dir={root}",
                 "name=teacher"]) == 0
    assert main(["reflow", "pairs", "--ckpt", str(root / "teacher"), "--num", "24", "--out", str(root / "pairs"),
                 "--steps", "2", "--precision", "fp32", "--no-progress"]) == 0
    return root


def _trainer(root, name, *extra, resume=False):
    from flowdit.train.config import RunConfig
    from flowdit.train.trainer import Trainer
    from flowdit.utils.config import load_config

    cfg = load_config(RunConfig, None, TINY_D + [f"out_dir={root}", f"name={name}", f"data.pairs={root / 'pairs'}",
                                                 *extra])
    return Trainer(cfg, resume=resume, progress=False)


def test_rfpp_and_distillation_train_through_the_core_trainer(teacher_and_pairs):
    root = teacher_and_pairs
    rfpp = _trainer(root, "rfpp", "flow.loss=rfpp", "flow.time_sampler=u_shaped:a=4",
                    f"train.init_from={root / 'teacher'}", "train.steps=2")
    assert isinstance(rfpp.objective.perceptual, FeatureDistance)
    assert math.isfinite(rfpp.fit()["loss"])
    k = _trainer(root, "k2", "distill.steps=2", "distill.loss=huber", "train.steps=1")
    assert set(k.draw(0)[3].tolist()) <= {1.0, 0.5}
    k.fit()


def test_slimflow_draws_anneal_and_flip_the_pairs(teacher_and_pairs):
    root = teacher_and_pairs
    pairs = load_pairs(root / "pairs")
    plain = _trainer(root, "plain", "train.steps=1")
    slim = _trainer(root, "slim", "distill.anneal_steps=4", "train.steps=1")
    x0, _, z, _, idx = slim.draw(0)  # b = 1: the pair's data with fresh noise
    assert torch.equal(x0, pairs.sample[idx]) and not torch.allclose(z, pairs.noise[idx])
    x0, _, z, _, idx = slim.draw(4)  # b = 0: the pair itself
    assert torch.equal(z, plain.draw(4)[2]) and torch.equal(z, pairs.noise[idx])
    flip = _trainer(root, "flip", "distill.flip=true", "train.steps=1")
    x0, _, z, _, idx = flip.draw(1)
    flipped = [not torch.equal(x0[i], pairs.sample[idx[i]]) for i in range(len(idx))]
    assert any(flipped) and not all(flipped)
    for i in range(len(idx)):
        want = (pairs.sample[idx[i]].flip(-1), pairs.noise[idx[i]].flip(-1)) if flipped[i] else \
            (pairs.sample[idx[i]], pairs.noise[idx[i]])
        assert torch.equal(x0[i], want[0]) and torch.equal(z[i], want[1])


def test_flow_guided_distillation_resumes_exactly(teacher_and_pairs):
    import os

    from flowdit.train.checkpoint import load_checkpoint

    root = teacher_and_pairs
    keys = ["distill.steps=1", "distill.loss=perceptual", f"distill.teacher={root / 'teacher'}",
            f"train.init_from={root / 'teacher'}"]
    torch.set_num_threads(1)  # bitwise-repeatable reductions
    try:
        _trainer(root, "a", *keys, "train.steps=4").fit()
        _trainer(root, "b", *keys, "train.steps=2").fit()
        b2 = _trainer(root, "b", *keys, "train.steps=4", resume=True)
        assert b2.step == 2 and b2.objective.teacher is not None
        b2.fit()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    for which in ("model", "ema"):
        wa, wb = load_checkpoint(root / "a").tensors[which], load_checkpoint(root / "b").tensors[which]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), which
