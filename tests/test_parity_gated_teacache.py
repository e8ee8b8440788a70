"""Parity of ``gated_taylor`` (CG-Taylor) and ``teacache`` with the authors' code, and
TeaCache's calibration.

Each reference is restated below as a block policy that follows the authors' per-call
code line by line (names kept), and runs beside flowdit's policy on a fake block stack
with known outputs and on a random-weight DiT sampled with Euler (one model call per
step, as the references' samplers) under batched guidance.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from torch import nn

from flowdit.accel import build_policy
from flowdit.accel.first_block_cache import (
    TeaCache,
    calibrate_teacache,
    calibrate_teacache_model,
    fit_teacache_coeffs,
    teacache_pairs,
)
from flowdit.accel.gated_taylor import GatedTaylor
from flowdit.models.layers import modulate
from flowdit.models.registry import build_model
from flowdit.sampling.context import StepContext
from flowdit.inference import generate

LABELS = torch.tensor([0, 1, 2, 0])
STEPS = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("DiT-tiny", input_size=8, in_channels=1, num_classes=3)
    # adaLN-Zero makes a fresh DiT the identity; a small perturbation gives every block
    # smooth work, so that both gates see a mix of small and large changes.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def sample(model, policy, labels=LABELS):
    return generate(model, labels, (1, 8, 8), solver="euler", steps=STEPS, cfg_scale=2.0, seed=3,
                    accel=policy).images


def traced(cls, key=None):
    """``cls`` recording per call whether it computed the whole stack (and ``st[key]``)."""

    class Traced(cls):
        def decide_and_run(self, model, tokens, c_act, ctx, st):
            before = self.stats.full_calls
            out = super().decide_and_run(model, tokens, c_act, ctx, st)
            self.decisions.append(self.stats.full_calls > before)
            self.values.append(st.get(key))
            return out

        def reset(self):
            super().reset()
            self.decisions, self.values = [], []

    return Traced


def pattern(decisions):
    return "".join("F" if d else "." for d in decisions)


# -- CG-Taylor ----------------------------------------------------------------------------


class ReferenceCGTaylor:
    """liuxiao-guan/CG-Taylor-DiT, ``models.py`` ``DiT.forward`` (``cache_dic["mode"] ==
    "Firstblock"``) with ``taylor_utils``' ``firstblock_derivative_approximation`` /
    ``firstblock_taylor_formula`` / ``step_derivative_approximation`` /
    ``step_taylor_formula`` and ``cache_init_step`` (first_enhance 2, both step lists
    starting at [49] = [N - 1]); ``current["step"]`` is the DDIM index ``i = N-1 .. 0``
    (``gaussian_diffusion.ddim_sample_loop_progressive``). Defaults of ``sample.py``."""

    cfg_mode = "batched"

    def __init__(self, num_steps, threshold=0.008, max_order=1, max_block_order=3, mid_cor=2):
        self.num_steps, self.threshold, self.mid_cor = num_steps, threshold, mid_cor
        self.max_order, self.firstblock_max_order, self.first_enhance = max_order, max_block_order, 2

    def reset(self):
        self.cache = {"hidden": {}, "firstblock_hidden": {}}
        self.block_activated_steps, self.activated_steps = [self.num_steps - 1], [self.num_steps - 1]
        self.cnt, self.predict_loss, self.decisions, self.values = 0, None, [], []

    def derivative(self, key, steps, max_order, step, feature):
        difference_distance = steps[-1] - steps[-2]
        updated = {0: feature}
        for i in range(max_order):
            if self.cache[key].get(i, None) is not None and step > self.first_enhance - 2:
                updated[i + 1] = (updated[i] - self.cache[key][i]) / difference_distance
            else:
                break
        self.cache[key] = updated

    def taylor(self, key, steps, step):
        x = step - steps[-1]
        output = 0
        for i in range(len(self.cache[key])):
            output += (1 / math.factorial(i)) * self.cache[key][i] * (x**i)
        return output

    def run(self, model, x, c, ctx):
        step = self.num_steps - 1 - ctx.step
        pre_firstblock_hidden_states = self.taylor("firstblock_hidden", self.block_activated_steps, step)
        x = model.blocks[0](x, c, ctx)
        if self.cnt > self.mid_cor:
            self.predict_loss = (pre_firstblock_hidden_states - x).abs().mean() / x.abs().mean()
            can_use_cache = self.predict_loss < self.threshold
            if not can_use_cache:
                self.block_activated_steps.append(step)
                self.derivative("firstblock_hidden", self.block_activated_steps, self.firstblock_max_order, step, x)
        else:
            self.block_activated_steps.append(step)
            self.derivative("firstblock_hidden", self.block_activated_steps, self.firstblock_max_order, step, x)
        if self.cnt == 0 or self.cnt == self.num_steps - 1:
            should_calc = True
            self.predict_loss = None
        else:
            if self.predict_loss is None:
                can_use_cache = False
            should_calc = not can_use_cache
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        if not should_calc:
            x = self.taylor("hidden", self.activated_steps, step)
        else:
            self.activated_steps.append(step)
            for block in model.blocks[1:]:
                x = block(x, c, ctx)
            self.derivative("hidden", self.activated_steps, self.max_order, step, x)
        self.decisions.append(should_calc)
        self.values.append(self.predict_loss)
        return x


class _LinearBlock(nn.Module):
    """Adds ``a + b s`` to its input (``s`` = model-call index); with ``replace`` it returns
    ``a + b s`` (+ ``kick`` at ``kick_at``) whatever its input, so its output is known."""

    def __init__(self, a, b, replace=False, kick=None, kick_at=None):
        super().__init__()
        self.a, self.b, self.replace, self.kick, self.kick_at = a, b, replace, kick, kick_at

    def forward(self, x, c_act, ctx):
        s = ctx.step
        out = self.a + self.b * s + (self.kick if s == self.kick_at else 0)
        return out if self.replace else x + out


def _fake(blocks):
    cfg = types.SimpleNamespace(hidden_size=4, mlp_ratio=4.0)
    return types.SimpleNamespace(blocks=nn.ModuleList(blocks), config=cfg)


def _drive(policy, model, inputs, num_steps):
    policy.reset()
    ctx = StepContext(block_policy=policy, num_steps=num_steps)
    outs = []
    for s, x in enumerate(inputs):
        ctx.step = s
        outs.append(policy.run(model, x, None, ctx))
    return outs


def test_gated_taylor_defaults_are_the_reference_dit_settings():
    p = build_policy("gated_taylor")
    assert (p.threshold, p.first_order, p.order, p.warmup) == (0.008, 3, 1, 3)
    assert (p.feature, p.norm, p.max_skip, p.spaced, p.form) == ("output", "l1", 0, False, "paper")


def test_gated_taylor_fake_stack_closed_form():
    """Block 0's output is linear in the call index except for a kick at call 8; blocks
    1-2 add linear terms; the input tokens are quadratic in the call index. Closed form:
    full at the 3 warm-up calls, forecasts while block 0's (exact, linear) forecast holds,
    full at the kick and for ``first_order + 1`` calls after it (the kicked value must
    leave each of the 4 derivative estimates), forecasts again, full at the final call.
    The forecast is of the stack *output* (linear here, so exact): every output equals
    the known stack output. Forecasting the residual (``feature=residual``) instead would
    extrapolate the quadratic input linearly."""
    torch.manual_seed(1)
    a, b = [torch.randn(1, 2, 4) for _ in range(3)], [torch.randn(1, 2, 4) for _ in range(3)]
    kick = 20 * torch.ones(1, 2, 4)
    stack = _fake([_LinearBlock(a[0], b[0], replace=True, kick=kick, kick_at=8),
                   _LinearBlock(a[1], b[1]), _LinearBlock(a[2], b[2])])
    u = torch.randn(1, 2, 4)
    n = 20
    inputs = [u * s**2 for s in range(n)]

    def g(s):
        return sum(a) + sum(b) * s + (kick if s == 8 else 0)

    policy = traced(GatedTaylor)(threshold=0.01)
    outs = _drive(policy, stack, inputs, n)
    assert pattern(policy.decisions) == "FFF.....FFFFF......F"
    for s, out in enumerate(outs):
        torch.testing.assert_close(out, g(s), atol=1e-4, rtol=1e-5)
    ref = ReferenceCGTaylor(n, threshold=0.01)
    ref_outs = _drive(ref, stack, inputs, n)
    assert ref.decisions == policy.decisions
    for out, want in zip(outs, ref_outs):
        torch.testing.assert_close(out, want, atol=0, rtol=0)
    # first_order 1: the kick costs first_order + 2 = 3 full calls.
    p1 = traced(GatedTaylor)(threshold=0.01, first_order=1)
    _drive(p1, stack, inputs, n)
    assert pattern(p1.decisions) == "FFF.....FFF........F"
    # Residual form on the same stack: the first forecast after the warm-up extrapolates
    # the residual g - u s^2 from calls 1 and 2 and adds the current input back.
    pr = GatedTaylor(threshold=1e9, feature="residual")
    out3 = _drive(pr, stack, inputs, n)[3]

    def r(s):
        return g(s) - inputs[s]

    torch.testing.assert_close(out3, inputs[3] + r(2) + (r(2) - r(1)), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(out3, g(3), atol=1e-2)


def test_gated_taylor_residual_option_exact_for_linear_residuals():
    """``feature=residual``: blocks that add linear terms to a quadratic input give linear
    residuals, which both forecasts reproduce exactly."""
    torch.manual_seed(2)
    stack = _fake([_LinearBlock(torch.randn(1, 2, 4), torch.randn(1, 2, 4)) for _ in range(3)])
    u = torch.randn(1, 2, 4)
    inputs = [u * s**2 for s in range(12)]
    policy = traced(GatedTaylor)(threshold=1e-3, feature="residual", norm="l2")
    outs = _drive(policy, stack, inputs, 12)
    assert pattern(policy.decisions) == "FFF........F"
    for s, out in enumerate(outs):
        want = inputs[s] + sum(blk.a + blk.b * s for blk in stack.blocks)
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.05, 0.1])
def test_gated_taylor_matches_reference_on_dit(model, threshold):
    policy = traced(GatedTaylor, "last_error")(threshold=threshold)
    ref = ReferenceCGTaylor(STEPS, threshold=threshold)
    out, want = sample(model, policy), sample(model, ref)
    assert policy.decisions == ref.decisions
    # the gate value of every gated call (the reference also evaluates it at the final call)
    for s, (got, loss) in enumerate(zip(policy.values, ref.values)):
        if 3 <= s < STEPS - 1:
            assert got == pytest.approx(float(loss), rel=1e-6), s
    d = pattern(policy.decisions)
    assert d.startswith("FFF") and d.endswith("F") and "." in d and "F" in d[3:-1], d
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


# -- TeaCache -----------------------------------------------------------------------------


class ReferenceTeaCache:
    """ali-vilab/TeaCache, ``TeaCache4FLUX/teacache_flux.py`` ``teacache_forward`` (the same
    loop as TeaCache4HunyuanVideo and the Open-Sora ``teacache_forward``): ``cnt`` counts
    model calls, ``num_steps`` of them per sampling run."""

    cfg_mode = "batched"

    def __init__(self, num_steps, rel_l1_thresh, coefficients):
        self.num_steps, self.rel_l1_thresh, self.coefficients = num_steps, rel_l1_thresh, coefficients

    def reset(self):
        self.cnt, self.accumulated_rel_l1_distance, self.decisions, self.values = 0, 0, [], []
        self.previous_modulated_input = self.previous_residual = None

    def run(self, model, hidden_states, c, ctx):
        block = model.blocks[0]
        shift_msa, scale_msa = block.modulation(c)[:2]
        modulated_inp = modulate(block.norm1(hidden_states), shift_msa, scale_msa)
        if self.cnt == 0 or self.cnt == self.num_steps - 1:
            should_calc = True
            self.accumulated_rel_l1_distance = 0
        else:
            rescale_func = np.poly1d(self.coefficients)
            self.accumulated_rel_l1_distance += rescale_func(
                ((modulated_inp - self.previous_modulated_input).abs().mean()
                 / self.previous_modulated_input.abs().mean()).cpu().item())
            if self.accumulated_rel_l1_distance < self.rel_l1_thresh:
                should_calc = False
            else:
                should_calc = True
                self.accumulated_rel_l1_distance = 0
        self.previous_modulated_input = modulated_inp
        self.cnt += 1
        if self.cnt == self.num_steps:
            self.cnt = 0
        if not should_calc:
            hidden_states = hidden_states + self.previous_residual
        else:
            ori_hidden_states = hidden_states.clone()
            for block in model.blocks:
                hidden_states = block(hidden_states, c, ctx)
            self.previous_residual = hidden_states - ori_hidden_states
        self.decisions.append(should_calc)
        self.values.append(self.accumulated_rel_l1_distance)
        return hidden_states


@pytest.mark.parametrize("threshold,coeffs", [(0.05, [0, 0, 0, 1, 0]), (0.08, [100.0, -20.0, 3.0, 1.5, 1e-3]),
                                              (0.3, [0, 0, 0, 1, 0])])
def test_teacache_matches_reference_on_dit(model, threshold, coeffs):
    policy = traced(TeaCache, "acc")(threshold=threshold, coeffs=tuple(coeffs))
    ref = ReferenceTeaCache(STEPS, threshold, coeffs)
    out, want = sample(model, policy), sample(model, ref)
    assert policy.decisions == ref.decisions
    assert policy.values == pytest.approx(ref.values, rel=1e-9, abs=0)  # the accumulated sum after each call
    d = pattern(policy.decisions)
    assert d[0] == "F" and d[-1] == "F" and "." in d and "F" in d[1:-1], d
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_teacache_final_call_runs_in_full(model):
    """Past the accumulator's reach every call but the first and the final one is cached."""
    policy = traced(TeaCache)(threshold=1e9)
    sample(model, policy)
    assert pattern(policy.decisions) == "F" + "." * (STEPS - 2) + "F"


def test_teacache_calibration_pairs_are_per_sample_input_and_output_changes(model):
    """Each recorded pair is (relative L1 change of block 0's modulated input, relative L1
    change of the model output) between consecutive calls of one sample, with both CFG
    rows of that sample: the values a run of that sample alone gives."""
    policy = TeaCache()
    pairs = teacache_pairs(policy, lambda: sample(model, policy))
    assert pairs.shape == ((STEPS - 1) * len(LABELS), 3)

    class Spy:
        """Uncached run of one sample that keeps block 0's modulated input and the output."""

        cfg_mode = "batched"

        def reset(self):
            self.m, self.v = [], []

        def run(self, model, x, c, ctx):
            block = model.blocks[0]
            shift, scale = block.modulation(c)[:2]
            self.m.append(modulate(block.norm1(x), shift, scale))
            for blk in model.blocks:
                x = blk(x, c, ctx)
            return x

        def after_output(self, model, v, ctx):
            self.v.append(v)
            return v

    def rel(a, b):
        return float((a - b).abs().mean() / b.abs().mean())

    for j in range(len(LABELS)):
        spy = Spy()
        generate(model, LABELS[j:j + 1], (1, 8, 8), solver="euler", steps=STEPS, cfg_scale=2.0, seed=3,
                 first_index=j, accel=spy)
        want = np.array([[s, rel(spy.m[s], spy.m[s - 1]), rel(spy.v[s], spy.v[s - 1])] for s in range(1, STEPS)])
        got = pairs[j::len(LABELS)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_teacache_fit_recovers_a_known_polynomial_and_round_trips_through_a_spec(model):
    coeffs = (300.0, -120.0, 20.0, 0.5, 0.01)
    x = np.linspace(0.0, 0.3, 40)
    np.testing.assert_allclose(fit_teacache_coeffs(x, np.polyval(coeffs, x)), coeffs, rtol=1e-6, atol=1e-8)
    res = calibrate_teacache_model(model, LABELS, (1, 8, 8), solver="euler", steps=STEPS, cfg_scale=2.0, seed=3)
    data = np.array(res["data"])
    assert res["pairs"] == len(data) == (STEPS - 1) * len(LABELS)
    np.testing.assert_allclose(res["coeffs"], np.polyfit(data[:, 1], data[:, 2], 4))
    np.testing.assert_allclose(build_policy(f"teacache:coeffs={res['spec']}").coeffs, res["coeffs"], rtol=1e-5)
    # The calibration run is uncached and leaves the policy usable: the same fit by the
    # policy-level entry point, which stores it on the policy.
    policy = TeaCache(threshold=0.2)
    got = calibrate_teacache(policy, lambda: sample(model, policy))
    assert policy.coeffs == got
    np.testing.assert_allclose(got, res["coeffs"], rtol=1e-6, atol=1e-9)


def test_calibration_script_fits_a_run_and_rejects_bad_input(tmp_path, capsys, monkeypatch):
    """``benchmarks/teacache_calibrate.py`` on a two-step training run: the JSON holds the
    fit of ``calibrate_teacache_model`` for the run's model; bad input exits with 2."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    from flowdit.cli import main as cli
    from flowdit.train.outputs import balanced_labels
    from flowdit.train.run import load_run_model

    tiny = ["data.dataset=digits", "model.name=DiT-tiny", "train.batch_size=16", "train.precision=fp32",
            "optim.warmup_steps=1", "train.steps=2", "train.ckpt_every=2"]
    assert cli(["train", "--no-progress", "--no-outputs", *tiny, f"out_dir={tmp_path}", "name=r"]) == 0
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("teacache_calibrate", bench / "teacache_calibrate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "coeffs.json"
    args = ["--run", str(tmp_path / "r"), "--out", str(out), "--num", "6", "--steps", "6", "--batch-size", "6",
            "--thresholds", "0.1"]
    assert script.main(args) == 0
    res = json.loads(out.read_text())
    model, meta = load_run_model(tmp_path / "r")
    want = calibrate_teacache_model(model, balanced_labels(model.num_classes, 6), tuple(meta["data"]["shape"]),
                                    steps=6, batch_size=6)
    np.testing.assert_allclose(res["coeffs"], want["coeffs"], rtol=1e-6)
    assert res["pairs"] == 5 * 6 and "data" not in res and len(res["sweep"]) == 1
    assert "coeffs=" + res["spec"] in capsys.readouterr().out
    assert script.main(["--run", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert script.main(["--run", str(tmp_path / "r"), "--out", str(out), "--thresholds", "a,b"]) == 2
    assert "--thresholds" in capsys.readouterr().err
    sys.modules.pop("common", None)
