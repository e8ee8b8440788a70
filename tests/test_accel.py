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
from flowdit.inference import generate


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
    half = RAS(ratio=0.5, full_every=4, warmup=1, metric="l2norm")
    out_half = run(model, half)
    assert not torch.equal(out_half, ref)
    assert half.stats.block_evals < half.stats.calls


def test_tome_merge_unmerge_roundtrip():
    x = torch.randn(2, 16, 8)
    merged, unmerge = bipartite_merge(x, 0)
    assert torch.equal(unmerge(merged).sort(dim=1).values, x.sort(dim=1).values)


def test_tome_merges_the_most_similar_pairs_into_their_means():
    """Tokens 0, 2, 4, 6 (set A) lie at decreasing cosine similarity to tokens 1, 3, 5, 7
    (set B): merging r = 2 averages A0 into B0 and A1 into B1, keeps the rest, and the
    unmerge hands each merged pair's mean back to both of its tokens."""
    e = torch.eye(8)
    b = e[:4]
    a = torch.stack([e[i] + (0.1 + 0.2 * i) * e[4 + i] for i in range(4)])
    x = torch.stack([a, b], dim=1).reshape(1, 8, 8)  # A0, B0, A1, B1, ...
    merged, unmerge = bipartite_merge(x, 2)
    want = torch.stack([a[2], a[3], (a[0] + b[0]) / 2, (a[1] + b[1]) / 2, b[2], b[3]])[None]
    torch.testing.assert_close(merged, want)
    back = unmerge(merged)[0]
    for i in range(4):
        pair = (a[i] + b[i]) / 2 if i < 2 else None
        torch.testing.assert_close(back[2 * i], pair if i < 2 else a[i])
        torch.testing.assert_close(back[2 * i + 1], pair if i < 2 else b[i])


def test_caches_skip_work(model):
    for spec in ("fora:interval=3", "fora:interval=3,cache=stack", "taylorseer:interval=3,order=1",
                 "taylorseer:interval=3,order=1,cache=stack", "delta_dit:interval=2,blocks=1", "fbcache:threshold=10"):
        policy = build_policy(spec)
        out = run(model, policy)
        assert policy.stats.block_evals < policy.stats.calls, spec
        assert torch.isfinite(out).all(), spec


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
    """A block whose pre-gate attention and MLP outputs are polynomials in the model-call
    index, ``a(s) = sum_i ca_i s^i`` and ``m(s) = sum_i cm_i s^i`` (zero without ``cm``),
    and whose gates are ``c_act`` and ``2 c_act`` (both 1 without conditioning), so the
    value of every cached or forecast call is known in closed form."""

    def __init__(self, ca, cm=None):
        super().__init__()
        self.ca, self.cm = ca, cm

    def branches_at(self, s):
        a = sum(c * s**i for i, c in enumerate(self.ca))
        m = torch.zeros_like(a) if self.cm is None else sum(c * s**i for i, c in enumerate(self.cm))
        return a, m

    def gates(self, c_act):
        g = torch.ones(1, 4) if c_act is None else c_act
        return g, 2 * g

    def forward_branches(self, x, c_act, ctx, attn_out=None, mlp_out=None):
        a, m = self.branches_at(ctx.step)
        a = a if attn_out is None else attn_out
        m = m if mlp_out is None else mlp_out
        g = 1 if c_act is None else c_act[:, None, :]
        return x + g * a + 2 * g * m, a, m

    def forward(self, x, c_act, ctx):
        return self.forward_branches(x, c_act, ctx)[0]


def _fake_model(ca, cm=None, depth=2):
    cfg = types.SimpleNamespace(hidden_size=4, mlp_ratio=4.0)
    return types.SimpleNamespace(blocks=nn.ModuleList([_StepBlock(ca, cm) for _ in range(depth)]), config=cfg)


def _gate(s):
    """Conditioning that changes from call to call, as DiT's t-dependent gates do."""
    return torch.full((1, 4), 1.0 + 0.1 * s)


def _drive(policy, model, steps, x, gates=True, num_steps=None, t=None):
    policy.reset()
    ctx = StepContext(block_policy=policy, num_steps=num_steps)
    outs = []
    for s in range(steps):
        ctx.step = s
        ctx.t = None if t is None else t(s)
        outs.append(policy.run(model, x, _gate(s) if gates else None, ctx))
    return outs


def _poly(coeffs, s):
    return sum(c * s**i for i, c in enumerate(coeffs))


def test_fora_cached_calls_take_the_current_gates_exactly():
    """Per-block FORA: ``x + sum_blocks g(s) a(s_full) + 2 g(s) m(s_full)``; the stack form
    adds ``out - in`` of the last full call, i.e. with the gates ``g(s_full)``."""
    ca, cm = [torch.randn(1, 3, 4), torch.randn(1, 3, 4)], [torch.randn(1, 3, 4)]
    model, x = _fake_model(ca, cm), torch.randn(1, 3, 4)
    n = 10  # full calls at reverse indices 9, 6, 3, 0: calls 0, 3, 6, 9
    for cache in ("blocks", "stack"):
        policy = build_policy(f"fora:interval=3,cache={cache}")
        outs = _drive(policy, model, n, x, num_steps=n)
        for s, out in enumerate(outs):
            f = 3 * (s // 3)
            gate = _gate(s if cache == "blocks" else f)[:, None, :]
            want = x + 2 * gate * (_poly(ca, f) + 2 * _poly(cm, f))
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        assert policy.stats.full_calls == 4


def test_taylorseer_per_block_forecast_is_exact_for_linear_branches():
    """Branch outputs linear in s: each block's first-order forecast is exact, and the
    current gates multiply it, so every call equals the uncached value. The stack form
    extrapolates ``g(s) (a(s) + 2 m(s))``, quadratic in s, linearly: its value is the
    line through the last two full calls."""
    ca, cm = [torch.randn(1, 3, 4), torch.randn(1, 3, 4)], [torch.randn(1, 3, 4), torch.randn(1, 3, 4)]
    model, x = _fake_model(ca, cm), torch.randn(1, 3, 4)

    def residual(s):
        return 2 * _gate(s)[:, None, :] * (_poly(ca, s) + 2 * _poly(cm, s))

    outs = _drive(build_policy("taylorseer:interval=3,order=1"), model, 12, x)
    for s, out in enumerate(outs):
        torch.testing.assert_close(out, x + residual(s), atol=1e-4, rtol=1e-4)
    full = [0, 1, 4, 7, 10]
    outs = _drive(build_policy("taylorseer:interval=3,order=1,cache=stack"), model, 12, x)
    for s, out in enumerate(outs):
        f0, f1 = [f for f in full if f <= s][-2:] if s > 0 else (0, 0)
        want = residual(s) if s in full else residual(f1) + (residual(f1) - residual(f0)) / (f1 - f0) * (s - f1)
        torch.testing.assert_close(out, x + want, atol=1e-4, rtol=1e-4)


def test_delta_dit_and_fbcache_cached_calls_exactly():
    """Delta-DiT (2 blocks, K = 1): early cached calls run block 0 and add block 1's delta
    of the last full call; late ones add block 0's delta and run block 1. FBCache runs
    block 0 and adds the rest's residual of the last full call."""
    ca = [torch.randn(1, 3, 4), torch.randn(1, 3, 4)]
    model, x = _fake_model(ca), torch.randn(1, 3, 4)
    r = lambda s: _poly(ca, s)  # noqa: E731  (each block's residual without gates)
    outs = _drive(build_policy("delta_dit:interval=2,blocks=1,boundary=0.5,warmup=1"), model, 8, x,
                  gates=False, t=lambda s: 1 - s / 8)
    for s, out in enumerate(outs):
        f = 2 * (s // 2)
        if s == f:
            want = x + 2 * r(s)
        elif 1 - s / 8 >= 0.5:
            want = x + r(s) + r(f)
        else:
            want = x + r(f) + r(s)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    policy = build_policy("fbcache:threshold=1e9,warmup=1,max_skip=2")
    outs = _drive(policy, model, 7, x, gates=False)
    for s, out in enumerate(outs):
        f = 3 * (s // 3)
        torch.testing.assert_close(out, x + r(s) + r(f), atol=1e-5, rtol=1e-5)
    assert policy.stats.full_calls == 3


@pytest.mark.parametrize("spec,coeffs", [
    ("taylorseer:interval=3,order=1,cache=stack", [torch.randn(1, 2, 4), torch.randn(1, 2, 4)]),
    ("taylorseer:interval=3,order=2,form=newton", [torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.randn(1, 2, 4)]),
])
def test_taylorseer_policy_forecast_is_exact_where_its_form_is(spec, coeffs):
    model = _fake_model(coeffs)
    policy = build_policy(spec)
    policy.reset()
    ctx = StepContext(block_policy=policy)
    x = torch.randn(1, 2, 4)
    f = lambda s: 2 * sum(c * s**i for i, c in enumerate(coeffs))  # noqa: E731
    for s in range(12):  # full calls 0, 1 (the warm-up), 4, 7, 10
        ctx.step = s
        # Right after the warm-up only calls 0 and 1 are known: the forecast is their line
        # (exact for a linear residual); from call 4 on the form's full order has its data.
        want = x + (f(1) + (f(1) - f(0)) * (s - 1) if s in (2, 3) else f(s))
        torch.testing.assert_close(policy.run(model, x, None, ctx), want, atol=1e-4, rtol=1e-4)
    assert policy.stats.full_calls == 5


@pytest.mark.parametrize("spec", ["taylorseer:interval=3,order=1,warmup=2,cache=stack,spaced={}",
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
    assert torch.equal(model(x, t, y, ctx=StepContext()), ref)

    class Watch:  # a hook at another point leaves the stack to the model
        name = "watch"

        def after_velocity(self, v, ctx):
            pass

    assert torch.equal(model(x, t, y, ctx=StepContext(hooks=[Watch()])), ref)


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
    assert rc == 2 and "has no parameter 'every'; valid: interval, cache, schedule, warmup, cfg" in capsys.readouterr().err


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
    # 2 seeds x 6 calls; FORA's count-down schedule runs reverse indices 5, 4, 2, 0 in full
    assert fora["full_calls"] == 8 and fora["model_calls"] == 12
    # DiT-tiny on 8x8 digits: D = 32, 16 tokens; a cached call computes only the modulation
    d, n = 32, 16
    block = 8 * n * d * d + 4 * n * n * d + 4 * n * d * 4 * d + 12 * d * d
    assert abs(fora["flops_ratio"] - (4 * block + 2 * 12 * d * d) / (6 * block)) < 1e-9
    assert fora["fewer_steps_fid_at_same_flops"] is not None
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
    from flowdit.inference import Generated

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


# -- gate x reuse ------------------------------------------------------------------------


@pytest.mark.parametrize("named,generic", [
    ("fora:interval=3", "cache:gate=schedule,reuse=blocks,interval=3"),
    ("fora:interval=2,cache=stack,schedule=start,warmup=2",
     "cache:gate=schedule,reuse=residual,interval=2,schedule=start,warmup=2"),
    ("taylorseer:interval=3,order=2", "cache:gate=schedule,reuse=taylor,schedule=since,interval=3,order=2,warmup=2"),
    ("taylorseer:interval=3,order=1,cache=stack,spaced=1",
     "cache:gate=schedule,reuse=taylor,schedule=since,interval=3,order=1,cache=stack,spaced=true,warmup=2"),
    ("delta_dit:interval=3,blocks=1", "cache:gate=schedule,reuse=delta,schedule=since,interval=3,warmup=1"),
    ("fbcache:threshold=0.3,max_skip=2", "cache:gate=fbcache,reuse=residual,threshold=0.3,max_skip=2"),
    ("teacache:threshold=0.3,coeffs=1/0", "cache:gate=teacache,reuse=residual,threshold=0.3,coeffs=1/0"),
])
def test_generic_spec_reproduces_the_named_combination(model, named, generic):
    """A named cache is its gate and reuse: the generic spec of the same pair gives the
    same samples bit for bit and the same compute statistics."""
    a, b = build_policy(named), build_policy(generic)
    out_a, out_b = run(model, a), run(model, b)
    assert torch.equal(out_a, out_b)
    assert a.stats == b.stats and a.stats.full_calls < a.stats.calls
    assert a.requires == b.requires
    assert repr(build_policy(repr(b))) == repr(b)


def test_fbcache_gate_with_taylor_reuse_skips_and_forecasts_exactly():
    """A pairing no named method has: FBCache's gate (block 0 runs every call) with a
    per-block Taylor forecast of the other blocks. With a threshold that always passes
    and at most two skips in a row, calls 0, 3 and 6 run in full; block 1's branches are
    linear in the call index, so once two full calls exist (from call 4 on) the forecast
    under the current gates is exact; calls 1 and 2 reuse call 0's branches."""
    ca, cm = [torch.randn(1, 3, 4), torch.randn(1, 3, 4)], [torch.randn(1, 3, 4), torch.randn(1, 3, 4)]
    model, x = _fake_model(ca, cm), torch.randn(1, 3, 4)

    def branch(s, at):  # one block's contribution at call s (current gates), branches of call `at`
        return _gate(s)[:, None, :] * (_poly(ca, at) + 2 * _poly(cm, at))

    policy = build_policy("cache:gate=fbcache,reuse=taylor,threshold=1e9,max_skip=2,order=1")
    assert policy.requires == {"block_branches"}
    outs = _drive(policy, model, 7, x)
    for s, out in enumerate(outs):
        want = x + branch(s, s) + branch(s, 0 if s in (1, 2) else s)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    st = policy.stats
    assert (st.calls, st.full_calls) == (7, 3)
    assert st.block_evals == 7 * 0.5 + 3 * 0.5  # block 0 every call, block 1 on full calls


def test_new_combination_on_dit_full_compute_setting_is_exact(model):
    ref = run(model)
    policy = build_policy("cache:gate=fbcache,reuse=taylor,threshold=0,order=1")
    assert torch.equal(run(model, policy), ref)
    assert policy.stats.full_calls == policy.stats.calls
    skipping = build_policy("cache:gate=fbcache,reuse=taylor,threshold=10,order=1,cache=stack")
    out = run(model, skipping)
    assert torch.isfinite(out).all() and skipping.stats.full_calls < skipping.stats.calls
    for spec in ("cache:gate=teacache,reuse=blocks,threshold=0", "cache:gate=confidence,reuse=residual,threshold=0",
                 "cache:gate=confidence,reuse=blocks,threshold=0"):
        assert torch.equal(run(model, build_policy(spec)), ref), spec


@pytest.mark.parametrize("spec,msg", [
    ("cache:gate=fb,reuse=taylor", "cache: gate must be one of schedule, fbcache, teacache, confidence (got 'fb')"),
    ("cache:gate=fbcache,reuse=forecast",
     "cache: reuse must be one of residual, blocks, taylor, delta (got 'forecast')"),
    ("cache:reuse=taylor", "cache: gate must be one of schedule, fbcache, teacache, confidence (none given)"),
    ("cache:gate=fbcache,reuse=taylor,interval=3",
     "cache: gate=fbcache with reuse=taylor has no parameter 'interval'; valid: gate, reuse, threshold, warmup, "
     "max_skip, order, form, cache, feature, spaced, cfg"),
    ("cache:gate=fbcache,reuse=delta", "cache: reuse delta needs the whole stack, but gate fbcache runs the first 1"),
    ("cache:gate=fbcache,reuse=taylor,order=-1", "cache: order must be an integer >= 0"),
    ("cache:gate=schedule,reuse=blocks,schedule=often", "cache: schedule must be one of fora, start, since"),
    ("cache:gate=schedule,reuse=residual,intervl=2", "accel policy 'cache' has no parameter 'intervl'; valid: gate"),
])
def test_generic_spec_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        build_policy(spec)
