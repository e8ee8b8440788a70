"""Block policies: exactness at full-compute settings, forecasts, state, parser errors."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from flowdit.accel import (
    RAS,
    FullCompute,
    NewtonForecaster,
    TaylorForecaster,
    bipartite_merge,
    build_policy,
    group_mask,
    parse_spec,
)
from flowdit.accel.base import BlockPolicyBase
from flowdit.errors import ConfigError
from flowdit.models.registry import build_model
from flowdit.sampling.context import StepContext
from flowdit.sampling.generate import generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("DiT-tiny", input_size=8, in_channels=1, num_classes=3)
    # adaLN-Zero makes a fresh DiT the identity map; random weights give every block work.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


LABELS = torch.tensor([0, 1, 2, 0])


def run(model, accel=None, solver="heun", steps=5, cfg=2.0, **kw):
    return generate(model, LABELS, (1, 8, 8), solver=solver, steps=steps, cfg_scale=cfg, seed=3,
                    accel=accel, **kw).images


FULL_SPECS = [
    "none", "fora:interval=1", "delta_dit:interval=1,blocks=1", "taylorseer:interval=1,order=2",
    "taylorseer:interval=1,order=2,form=newton", "taylorseer:interval=1,order=1,spaced=1", "gated_taylor:threshold=0",
    "fbcache:threshold=0", "teacache:threshold=0", "ras:full_every=1", "tome:ratio=0",
]


@pytest.mark.parametrize("spec", FULL_SPECS)
@pytest.mark.parametrize("cfg_mode", ["batched", "split"])
def test_full_compute_settings_reproduce_uncached(model, spec, cfg_mode):
    ref = run(model)
    sep = "," if ":" in spec else ":"
    out = run(model, build_policy(f"{spec}{sep}cfg={cfg_mode}"))
    if cfg_mode == "batched":
        assert torch.equal(out, ref)
    else:  # the two branches run as two batches: same math, possibly other kernels' rounding
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("solver", ["euler", "rf3"])
def test_full_compute_with_other_solvers(model, solver):
    ref = run(model, solver=solver, steps=3)
    assert torch.equal(run(model, build_policy("taylorseer:interval=1"), solver=solver, steps=3), ref)


def test_grouped_attention_one_group_is_full_attention(model):
    ref = run(model)
    torch.testing.assert_close(run(model, build_policy("grat:group=4,mode=local")), ref, atol=1e-5, rtol=0)
    m = group_mask(4, 2, "criss")
    assert m.shape == (16, 16) and m.all(dim=1).logical_not().all() and m.diagonal().all()


def test_ras_all_tokens_selected_equals_uncached(model):
    ref = run(model)
    policy = RAS(ratio=1.0, full_every=100, warmup=1)
    out = run(model, policy)
    # ratio 1 goes through the partial path: gathered tokens, cached K/V, merged velocity.
    assert policy.stats.full_calls < policy.stats.calls
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    half = RAS(ratio=0.5, full_every=4, warmup=1)
    out_half = run(model, half)
    assert not torch.equal(out_half, ref)
    assert half.stats.block_evals < half.stats.calls


def test_tome_merge_unmerge_roundtrip():
    x = torch.randn(2, 16, 8)
    merged, unmerge = bipartite_merge(x, 0)
    assert torch.equal(unmerge(merged).sort(dim=1).values, x.sort(dim=1).values)
    merged, unmerge = bipartite_merge(x, 5)
    assert merged.shape == (2, 11, 8) and unmerge(merged).shape == x.shape


def test_caches_skip_work(model):
    ref = run(model)
    for spec in ("fora:interval=3", "taylorseer:interval=3,order=1", "delta_dit:interval=2,blocks=1",
                 "fbcache:threshold=10", "teacache:threshold=10", "gated_taylor:threshold=10,order=1"):
        policy = build_policy(spec)
        out = run(model, policy)
        assert policy.stats.block_evals < policy.stats.calls, spec
        assert torch.isfinite(out).all() and not torch.equal(out, ref), spec


# -- forecasts --------------------------------------------------------------------------


def test_taylor_paper_form_exact_for_linear_features():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    for order in (1, 2, 3):
        fc = TaylorForecaster(order)
        for s in (0, 2, 3, 7):  # uneven spacing
            fc.update(s, a + b * s)
        for s in (8, 9.5, 12):
            torch.testing.assert_close(fc.predict(s), a + b * s, atol=1e-5, rtol=1e-5)


def test_taylor_paper_form_is_not_exact_for_quadratics():
    fc = TaylorForecaster(2)
    for s in (0, 1, 2):
        fc.update(s, torch.tensor([float(s * s)]))
    assert abs(float(fc.predict(4)) - 16.0) > 0.5


def test_newton_form_exact_for_polynomials_up_to_its_order():
    c = torch.randn(4, 5)
    for order in (1, 2, 3):
        f = lambda s: sum(c[i] * s**i for i in range(order + 1))  # noqa: E731
        fc = NewtonForecaster(order)
        for s in (0, 1, 3, 4, 6):
            fc.update(s, f(s))
        for s in (7, 9, 10.5):
            torch.testing.assert_close(fc.predict(s), f(s), atol=1e-3, rtol=1e-4)


class _StepBlock(nn.Module):
    """A block whose residual is a polynomial in the model-call index."""

    def __init__(self, coeffs):
        super().__init__()
        self.coeffs = coeffs

    def forward(self, x, c_act, ctx):
        s = ctx.step
        return x + sum(c * s**i for i, c in enumerate(self.coeffs))


def _fake_model(coeffs):
    cfg = types.SimpleNamespace(hidden_size=4, mlp_ratio=4.0)
    return types.SimpleNamespace(blocks=nn.ModuleList([_StepBlock(coeffs), _StepBlock(coeffs)]), config=cfg)


@pytest.mark.parametrize("spec,coeffs", [
    ("taylorseer:interval=3,order=1", [torch.randn(1, 2, 4), torch.randn(1, 2, 4)]),
    ("taylorseer:interval=3,order=2,form=newton", [torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4)]),
])
def test_taylorseer_policy_forecast_is_exact_where_its_form_is(spec, coeffs):
    model = _fake_model(coeffs)
    policy = build_policy(spec)
    policy.reset()
    ctx = StepContext(block_policy=policy)
    x = torch.randn(1, 2, 4)
    for s in range(12):
        ctx.step = s
        want = x + 2 * sum(c * s**i for i, c in enumerate(coeffs))
        torch.testing.assert_close(policy.run(model, x, None, ctx), want, atol=1e-4, rtol=1e-4)
    assert policy.stats.full_calls < 12


@pytest.mark.parametrize("spec", ["taylorseer:interval=3,order=1,warmup=2,spaced={}",
                                  "gated_taylor:threshold=1e9,order=1,max_skip=2,warmup=2,spaced={}"])
def test_spaced_forecast_keeps_warmup_calls_out_of_its_differences(spec):
    """A stack residual that is linear in the call index except for a kick at call 0. The
    paper's form differences the consecutive warmup calls 0 and 1 and so extrapolates the
    kick over the first interval; with ``spaced=true`` the first interval reuses call 1's
    residual. Both are exact once a slope from calls one interval apart exists. The gated
    forecast with a threshold that always passes and at most two forecasts in a row runs
    in full at the same calls."""
    coeffs = [torch.randn(1, 2, 4), torch.randn(1, 2, 4)]
    kick = 5 * torch.randn(1, 2, 4)

    class Kicked(_StepBlock):
        def forward(self, x, c_act, ctx):
            return super().forward(x, c_act, ctx) + (kick if ctx.step == 0 else 0)

    model = types.SimpleNamespace(blocks=nn.ModuleList([Kicked(coeffs), _StepBlock(coeffs)]),
                                  config=types.SimpleNamespace(hidden_size=4, mlp_ratio=4.0))

    def residual(s):
        return 2 * (coeffs[0] + coeffs[1] * s) + (kick if s == 0 else 0)

    for spaced in (True, False):
        policy = build_policy(spec.format(int(spaced)))
        assert policy.spaced is spaced
        policy.reset()
        ctx = StepContext(block_policy=policy)
        x = torch.zeros(1, 2, 4)
        for s in range(14):  # full calls at 0, 1, 4, 7, 10, 13
            ctx.step = s
            out = policy.run(model, x, None, ctx)
            if s in (2, 3):  # right after the warmup: reuse of call 1, or the slope from calls 0 and 1
                want = residual(1) + (0 if spaced else (residual(1) - residual(0)) * (s - 1))
            else:  # full calls, and forecasts from the slope of calls 1 and 4 (or later pairs)
                want = residual(s)
            torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="spaced must be true or false"):
        build_policy(spec.format("maybe"))


# -- state -------------------------------------------------------------------------------


class _Spy(BlockPolicyBase):
    name = "spy"

    def decide_and_run(self, model, tokens, c_act, ctx, st):
        st.setdefault("rows", set()).add(tokens.shape[0])
        st["calls"] = st.get("calls", 0) + 1
        return super().decide_and_run(model, tokens, c_act, ctx, st)


def test_state_reset_between_sampling_calls(model):
    policy = build_policy("taylorseer:interval=3,order=2")
    first = run(model, policy)
    calls = policy.stats.calls
    second = run(model, policy)
    # statistics accumulate over calls; the cached features do not
    assert torch.equal(first, second) and policy.stats.calls == 2 * calls
    assert torch.equal(run(model, build_policy("taylorseer:interval=3,order=2")), first)


def test_state_kept_apart_between_cfg_branches(model):
    split, batched = _Spy(cfg="split"), _Spy(cfg="batched")
    run(model, split, steps=3)
    assert set(split._states) == {"cond", "uncond"}
    assert split._states["cond"] is not split._states["uncond"]
    assert split._states["cond"]["rows"] == {4} and split._states["cond"]["calls"] == 6
    run(model, batched, steps=3)
    assert set(batched._states) == {"batched"} and batched._states["batched"]["rows"] == {8}
    # Split branches of a cache differ from the batched state but both stay close to
    # the reference, and each branch keeps its own forecaster.
    ts = build_policy("taylorseer:interval=2,order=1,cfg=split")
    run(model, ts)
    fc = ts._states["cond"]["forecaster"], ts._states["uncond"]["forecaster"]
    assert fc[0] is not fc[1] and not torch.equal(fc[0].factors[0], fc[1].factors[0])


def test_batched_state_follows_batch_size(model):
    # a guidance interval switches between 2B-row and B-row calls: states must not mix
    policy = build_policy("fora:interval=2")
    out = run(model, policy, guidance_interval=(0.3, 0.7), steps=6)
    assert torch.isfinite(out).all() and {"cond", "batched"} <= set(policy._states)


def test_context_without_policy_runs_all_blocks(model):
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])
    ref = model(x, t, y)
    assert torch.equal(model(x, t, y, ctx=types.SimpleNamespace(anything=1)), ref)
    assert torch.equal(model(x, t, y, ctx=StepContext()), ref)


# -- spec parser -------------------------------------------------------------------------


@pytest.mark.parametrize("spec,msg", [
    ("taylorsear:interval=4", "unknown accel policy 'taylorsear'; valid: none, fora"),
    ("taylorseer:intervl=4", "has no parameter 'intervl'; valid: interval, order"),
    ("taylorseer:interval", "expected key=value"),
    ("taylorseer:interval=0", "interval must be an integer >= 1"),
    ("taylorseer:interval=2.5", "interval must be an integer >= 1"),
    ("taylorseer:form=cubic", "form must be one of paper, newton"),
    ("fora:interval=2,interval=3", "given twice"),
    ("ras:ratio=1.5", "ratio must lie in"),
    ("fora:cfg=both", "cfg must be one of batched, split"),
    ("", "non-empty"),
])
def test_spec_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        build_policy(spec) if spec else parse_spec(spec)


def test_spec_roundtrip():
    p = build_policy("taylorseer:interval=4,order=2")
    assert p.interval == 4 and p.order == 2
    assert repr(build_policy(repr(p))) == repr(p)
    assert build_policy(None) is None and build_policy(p) is p


def test_cli_rejects_bad_accel_spec_before_loading(tmp_path, capsys):
    from flowdit.cli import main

    rc = main(["sample", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png"),
               "--accel", "fora:every=2"])
    assert rc == 2 and "has no parameter 'every'; valid: interval, warmup, cfg" in capsys.readouterr().err


def _two_step_run(tmp_path, monkeypatch):
    """A two-step DiT-tiny digits run at ``tmp_path / "r"``, evaluator cache under ``tmp_path``."""
    from flowdit.cli import main

    monkeypatch.setenv("FLOWDIT_CACHE", str(tmp_path / "cache"))
    tiny = ["data.dataset=digits", "model.name=DiT-tiny", "train.batch_size=16", "train.precision=fp32",
            "optim.warmup_steps=1", "train.steps=2", "train.ckpt_every=2"]
    assert main(["train", "--no-progress", "--no-outputs", *tiny, f"out_dir={tmp_path}", "name=r"]) == 0


def test_bench_accel_writes_table_json_and_plot(tmp_path, monkeypatch):
    """End to end on a two-step digits run: every row is present and the baseline columns
    are filled from the fewer-steps curve."""
    import json

    from flowdit.cli import main

    _two_step_run(tmp_path, monkeypatch)
    assert main(["bench", "accel", "--run", str(tmp_path / "r"), "--num", "20", "--seeds", "0,1", "--solver", "euler",
                 "--steps", "6", "--fewer-steps", "2,3", "--methods", "fora:interval=2;taylorseer:interval=3,order=1",
                 "--out-dir", str(tmp_path / "res"), "--name", "a", "--device", "cpu", "--precision", "bf16"]) == 0
    rows = json.loads((tmp_path / "res" / "a.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["uncached", "uncached, 2 steps", "uncached, 3 steps",
                                           "fora:interval=2", "taylorseer:interval=3,order=1"]
    fora = rows[3]
    assert fora["full_calls"] == 6 and fora["model_calls"] == 12  # 2 seeds x 6 calls, every second one full
    assert abs(fora["flops_ratio"] - 0.5) < 1e-9 and fora["fewer_steps_fid_at_same_flops"] is not None
    assert rows[0]["psnr"] >= 100 and all(r["fid"] > 0 for r in rows)
    assert rows[0]["dfid_vs_uncached"] == [0.0, 0.0] and len(fora["fid_per_seed"]) == 2
    assert abs(fora["dfid_vs_uncached"][0] - (fora["fid"] - rows[0]["fid"])) < 1e-9
    md = (tmp_path / "res" / "a.md").read_text()
    assert "CFG 1.5, bf16;" in md and "| fora:interval=2 |" in md and (tmp_path / "res" / "a.png").is_file()
    assert "reused" not in md


def test_bench_accel_resumes_from_its_cells(tmp_path, monkeypatch):
    """A second run with the same arguments samples nothing again and gives the same table;
    a changed setting (another guidance scale) does not reuse the cells; --fresh starts over."""
    import json

    from flowdit.bench import accel as bench
    from flowdit.cli import main

    _two_step_run(tmp_path, monkeypatch)
    argv = ["bench", "accel", "--run", str(tmp_path / "r"), "--num", "10", "--seeds", "0,1", "--solver", "euler",
            "--steps", "4", "--fewer-steps", "2", "--methods", "fora:interval=2", "--out-dir", str(tmp_path / "res"),
            "--name", "a", "--device", "cpu"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "res" / "a.json").read_text())["rows"]
    calls = []
    real = bench.measure_seed
    monkeypatch.setattr(bench, "measure_seed", lambda *a, **k: calls.extend(p.name for p in a[4]) or real(*a, **k))
    assert main(argv) == 0
    assert calls == []
    again = json.loads((tmp_path / "res" / "a.json").read_text())["rows"]
    assert [(r["fid"], r["seconds"]) for r in again] == [(r["fid"], r["seconds"]) for r in first]
    assert "6 of 6 seed measurements were reused" in (tmp_path / "res" / "a.md").read_text()
    assert main(argv + ["--cfg", "1.0"]) == 0
    assert len(calls) == 6  # 3 measurements x 2 seeds
    assert main(argv + ["--seeds", "0,1,2"]) == 0  # a new seed: only it is sampled
    assert calls[6:] == ["uncached x4", "uncached x2", "fora:interval=2 x4"]
    assert main(argv + ["--fresh"]) == 0
    assert len(calls) == 15


def test_bench_accel_interleaves_measurements_batch_by_batch(monkeypatch):
    """Every measurement of a seed samples batch ``b`` before any samples batch ``b + 1``,
    in alternating order, and each batch draws the noise of its own sample indices."""
    from flowdit.bench import accel as bench
    from flowdit.sampling.generate import Generated

    seen = []

    def fake_sample(model, meta, labels, seed, policy, args, steps, device, first_index=0):
        seen.append((steps, first_index, len(labels)))
        return Generated(torch.zeros(len(labels), 1, 2, 2), labels, steps)

    monkeypatch.setattr(bench, "_sample", fake_sample)
    plans = [bench.Plan(f"x{k}", None, k, "fewer_steps", FullCompute()) for k in (8, 4, 2)]
    args = types.SimpleNamespace(batch_size=4)
    parts = bench.measure_seed(None, None, torch.arange(10), 0, plans, args, torch.device("cpu"))
    assert seen == [(8, 0, 4), (4, 0, 4), (2, 0, 4), (2, 4, 4), (4, 4, 4), (8, 4, 4), (8, 8, 2), (4, 8, 2), (2, 8, 2)]
    assert all(p["images"].shape == (10, 1, 2, 2) and p["seconds"] > 0 for p in parts.values())
    assert parts["x4"]["nfe"] == 4
