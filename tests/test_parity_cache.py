"""Parity of ``fora`` and ``taylorseer`` with the authors' public code.

Each test restates the reference's cache logic in a few lines (citing the file and
function it follows), drives flowdit's own DiT modules with it in a plain Euler loop with
batched classifier-free guidance, and checks that flowdit's policy, run through
``generate``'s machinery, produces the same samples. The step index of both references
counts *down* (``num_steps - 1`` to 0), as in their DDPM/DDIM loops; flowdit counts model
calls up, so agreement also checks the conversion.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowdit.accel import build_policy
from flowdit.accel.fora import fora_full_call
from flowdit.models.layers import modulate
from flowdit.models.registry import build_model
from flowdit.sampling.context import StepContext
from flowdit.sampling.guidance import cfg_velocity
from flowdit.sampling.sample import sample


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("DiT-tiny", input_size=8, in_channels=1, num_classes=3)
    m.config.depth = len(m.blocks)
    with torch.no_grad():
        for p in m.parameters():  # random weights: every gate depends on t and every block works
            p.add_(0.3 * torch.randn_like(p))
    return m.eval()


Y = torch.tensor([0, 1, 2, 1])
STEPS, CFG = 20, 2.0


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def flowdit_samples(model, spec, noise):
    ctx = StepContext(block_policy=build_policy(spec))
    fn = cfg_velocity(model, Y, model.null_class, CFG, ctx=ctx)
    return sample(fn, noise, solver="euler", steps=STEPS, step_context=ctx).x


def reference_samples(model, block_forward, noise, current, cache_dic, cal_type):
    """Euler from t = 1 to 0 with the reference's batched CFG (``forward_with_cfg``: one
    forward of ``[x, x]`` with ``[y, null]``, ``uncond + s (cond - uncond)``)."""
    ts = torch.linspace(1, 0, STEPS + 1, dtype=torch.float64).tolist()
    y2 = torch.cat([Y, torch.full_like(Y, model.null_class)])
    x = noise
    with torch.no_grad():
        for i in range(STEPS):
            current["step"] = STEPS - 1 - i  # the reference's reverse index
            xx = torch.cat([x, x])
            tokens, c_act = model.embed(xx, torch.full((len(xx),), ts[i]), y2)
            cal_type(cache_dic, current)
            for layer, block in enumerate(model.blocks):
                current["layer"] = layer
                tokens = block_forward(block, tokens, c_act, current, cache_dic)
            v = model.unpatchify(model.final_layer(tokens, c_act))
            v_c, v_u = v[: len(x)], v[len(x):]
            x = x + (ts[i + 1] - ts[i]) * (v_u + CFG * (v_c - v_u))
    return x


# -- TaylorSeer (Shenyi-Z/TaylorSeer, TaylorSeer-DiT) -------------------------------------


def ts_cal_type(cache_dic, current):
    """``cache_functions/cal_type.py``, ``cal_type``."""
    first_steps = current["step"] > current["num_steps"] - cache_dic["first_enhance"] - 1
    if first_steps or cache_dic["cache_counter"] == cache_dic["interval"] - 1:
        current["type"] = "full"
        cache_dic["cache_counter"] = 0
        current["activated_steps"].append(current["step"])
    else:
        cache_dic["cache_counter"] += 1
        current["type"] = "Taylor"


def ts_derivative_approximation(cache_dic, current, feature):
    """``taylor_utils/__init__.py``, ``derivative_approximation``."""
    dist = current["activated_steps"][-1] - current["activated_steps"][-2]
    old = cache_dic["cache"][current["layer"]][current["module"]]
    new = {0: feature}
    for i in range(cache_dic["max_order"]):
        if old.get(i) is not None and current["step"] < current["num_steps"] - cache_dic["first_enhance"] + 1:
            new[i + 1] = (new[i] - old[i]) / dist
        else:
            break
    cache_dic["cache"][current["layer"]][current["module"]] = new


def ts_taylor_formula(cache_dic, current):
    """``taylor_utils/__init__.py``, ``taylor_formula``."""
    x = current["step"] - current["activated_steps"][-1]
    factors = cache_dic["cache"][current["layer"]][current["module"]]
    return sum(factors[i] * (x**i) / math.factorial(i) for i in range(len(factors)))


def ts_block_forward(block, x, c, current, cache_dic):
    """``models.py``, ``DiTBlock.forward`` (with ``taylor_cache_init`` at the first step)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)
    if current["type"] == "full":
        for module in ("attn", "mlp"):
            current["module"] = module
            if current["step"] == current["num_steps"] - 1:
                cache_dic["cache"][current["layer"]][module] = {}
            if module == "attn":
                out = block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
                ts_derivative_approximation(cache_dic, current, out)
                x = x + gate_msa.unsqueeze(1) * out
            else:
                out = block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
                ts_derivative_approximation(cache_dic, current, out)
                x = x + gate_mlp.unsqueeze(1) * out
    else:
        current["module"] = "attn"
        x = x + gate_msa.unsqueeze(1) * ts_taylor_formula(cache_dic, current)
        current["module"] = "mlp"
        x = x + gate_mlp.unsqueeze(1) * ts_taylor_formula(cache_dic, current)
    return x


def taylorseer_reference(model, noise, interval, max_order, first_enhance):
    """``cache_functions/cache_init.py``, ``cache_init`` (``activated_steps`` starts at the
    first step index, ``first_enhance`` is 2 there and 3 in the FLUX code)."""
    cache_dic = {"cache": {j: {} for j in range(len(model.blocks))}, "interval": interval,
                 "max_order": max_order, "first_enhance": first_enhance, "cache_counter": 0}
    current = {"num_steps": STEPS, "activated_steps": [STEPS - 1]}
    return reference_samples(model, ts_block_forward, noise, current, cache_dic, ts_cal_type)


@pytest.mark.parametrize("interval,order,warmup", [(4, 4, 2), (3, 2, 3), (5, 1, 2), (3, 3, 4)])
def test_taylorseer_matches_reference_code(model, interval, order, warmup):
    noise = torch.randn(len(Y), 1, 8, 8, generator=torch.Generator().manual_seed(1))
    want = taylorseer_reference(model, noise, interval, order, warmup)
    got = flowdit_samples(model, f"taylorseer:interval={interval},order={order},warmup={warmup}", noise)
    # flowdit accumulates the gated branches with fused multiply-adds: rounding-level
    # differences, which a third-order forecast amplifies to ~1e-6 of the samples' norm
    assert rel_err(got, want) < 1e-5
    # the reference differs from plain sampling, so the comparison has teeth
    assert rel_err(flowdit_samples(model, "none", noise), want) > 1e-2


def test_taylorseer_defaults_are_the_dit_codes():
    """``sample.py``: ``--interval 4 --max-order 4``; ``cache_init``: ``first_enhance = 2``."""
    p = build_policy("taylorseer")
    assert (p.interval, p.order, p.warmup, p.cache, p.spaced, p.cfg_mode) == (4, 4, 2, "blocks", False, "batched")


def test_taylorseer_stack_form_differs_from_reference(model):
    """The stack residual freezes the gates of the last full call: on a DiT whose gates
    depend on t, the two forms give different samples (the stack form is an option)."""
    noise = torch.randn(len(Y), 1, 8, 8, generator=torch.Generator().manual_seed(2))
    blocks = flowdit_samples(model, "taylorseer:interval=4,order=1", noise)
    stack = flowdit_samples(model, "taylorseer:interval=4,order=1,cache=stack", noise)
    assert rel_err(stack, blocks) > 1e-2


# -- FORA (prathebaselva/FORA) ---------------------------------------------------------


def fora_block_forward(block, x, c, current, cache_dic):
    """``src/models.py``, ``DiTBlock.forward``, branch ``boost_infer_static``."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)
    step, numstep, n = current["step"], current["num_steps"], cache_dic["interval"]
    cache = cache_dic["cache"][current["layer"]]
    if step == int(numstep - 1) or step % int(n) == 0:
        cache["attn"] = block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
        x = x + gate_msa.unsqueeze(1) * cache["attn"]
        cache["mlp"] = block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
        x = x + gate_mlp.unsqueeze(1) * cache["mlp"]
    else:
        x = x + gate_msa.unsqueeze(1) * cache["attn"]
        x = x + gate_mlp.unsqueeze(1) * cache["mlp"]
    return x


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_fora_matches_reference_code(model, interval):
    noise = torch.randn(len(Y), 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cache_dic = {"cache": {j: {} for j in range(len(model.blocks))}, "interval": interval}
    want = reference_samples(model, fora_block_forward, noise, {"num_steps": STEPS}, cache_dic,
                             lambda cache_dic, current: None)
    policy = build_policy(f"fora:interval={interval}")
    ctx = StepContext(block_policy=policy)
    fn = cfg_velocity(model, Y, model.null_class, CFG, ctx=ctx)
    got = sample(fn, noise, solver="euler", steps=STEPS, step_context=ctx).x
    assert rel_err(got, want) < 1e-5
    expected_full = sum(1 for r in range(STEPS) if r == STEPS - 1 or r % interval == 0)  # reverse indices
    assert policy.stats.full_calls == expected_full
    assert rel_err(flowdit_samples(model, "none", noise), want) > 1e-2


def test_fora_schedule_is_the_reference_count_down():
    # reverse index i = numstep - 1 .. 0; full iff i == numstep - 1 or i % N == 0
    for numstep, n in ((50, 3), (20, 4), (7, 2), (10, 1)):
        want = [i == numstep - 1 or i % n == 0 for i in range(numstep - 1, -1, -1)]
        assert [fora_full_call(s, numstep, n) for s in range(numstep)] == want
        assert fora_full_call(numstep - 1, numstep, n)  # the last call is always full
    # without a known number of calls (adaptive solvers): every N-th from the first
    assert [fora_full_call(s, None, 3) for s in range(7)] == [True, False, False, True, False, False, True]
    assert [fora_full_call(s, 10, 3, "start") for s in range(7)] == [True, False, False, True, False, False, True]


def test_caches_keep_the_doubled_cfg_batch_by_default():
    """Both references run the conditional and unconditional rows as one batch with one
    cache (``forward_with_cfg``); every policy defaults to the same."""
    from flowdit.accel.registry import POLICIES

    for name, cls in POLICIES.items():
        assert cls().cfg_mode == "batched", name
