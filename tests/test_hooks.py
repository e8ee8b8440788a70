"""The step context's hook list: order, points, counters, refusals, and composition of a
block policy with RF-Edit's value sharing."""

import pytest
import torch

from flowdit.accel import build_policy
from flowdit.core.hooks import HookList, StepContext
from flowdit.edit import inversion_grid, model_velocity, rf_edit, sampling_grid, value_sharing
from flowdit.errors import ConfigError
from flowdit.sampling import sample


class Affine:
    """An output hook ``v -> a v + b``."""

    def __init__(self, name, a, b):
        self.name, self.a, self.b = name, a, b

    def after_output(self, model, v, ctx):
        return self.a * v + self.b


def test_output_hooks_run_in_registration_order(tiny, batch):
    x, y, _ = batch
    t = torch.full((3,), 0.4)
    ref = tiny(x, t, y)
    ctx = StepContext(hooks=[Affine("double", 2.0, 0.0), Affine("shift", 1.0, 1.0)])
    torch.testing.assert_close(tiny(x, t, y, ctx=ctx), 2 * ref + 1, rtol=0, atol=1e-6)
    ctx = StepContext(hooks=[Affine("shift", 1.0, 1.0), Affine("double", 2.0, 0.0)])
    torch.testing.assert_close(tiny(x, t, y, ctx=ctx), 2 * (ref + 1), rtol=0, atol=1e-6)
    assert ctx.hooks.names() == ["shift", "double"]
    ctx.hooks.remove("shift")
    torch.testing.assert_close(tiny(x, t, y, ctx=ctx), 2 * ref, rtol=0, atol=1e-6)


class Recorder:
    """Records what the context says at every evaluation and every reset."""

    name = "recorder"

    def __init__(self):
        self.seen, self.resets, self.velocities = [], 0, 0

    def reset(self):
        self.resets += 1

    def begin_evaluation(self, ctx):
        self.seen.append((ctx.step, ctx.solver_step, ctx.eval_in_step, round(ctx.t, 6)))

    def after_velocity(self, v, ctx):
        self.velocities += 1


def test_the_loop_counts_evaluations_per_step_and_resets_every_call(tiny, batch):
    x, y, _ = batch
    rec = Recorder()
    ctx = StepContext(hooks=[rec])
    fn = model_velocity(tiny, y, 1.5, ctx=ctx)  # guided: one evaluation, both branches
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    sample(fn, x, "heun", schedule=grid, step_context=ctx)
    # Heun: evaluations at t_i and t_{i+1} of each step; the last step ends at t = 0.
    assert rec.seen == [(0, 0, 0, 1.0), (1, 0, 1, 0.5), (2, 1, 0, 0.5), (3, 1, 1, 0.0)]
    assert rec.velocities == 4 and rec.resets == 1
    sample(fn, x, "euler", schedule=grid, step_context=ctx)
    assert rec.resets == 2 and rec.seen[4:] == [(0, 0, 0, 1.0), (1, 1, 0, 0.5)]


def test_hook_list_refusals():
    fora, delta = build_policy("fora"), build_policy("delta_dit")
    hooks = HookList([fora])
    with pytest.raises(ConfigError, match="second block-stack policy"):
        hooks.add(delta)
    with pytest.raises(ConfigError, match="already registered"):
        hooks.add(Affine("fora", 1.0, 0.0))
    with pytest.raises(ConfigError, match="implements none of"):
        hooks.add(object(), name="nothing")


def test_a_second_stack_owner_is_refused_under_any_name():
    hooks = HookList([build_policy("fora")])
    with pytest.raises(ConfigError, match="second block-stack policy"):
        hooks.add(build_policy("delta_dit"), name="other")
    assert hooks.names() == ["fora"] and hooks.stack is hooks.get("fora")


# -------------------------------------------------- a cache and RF-Edit at once


@pytest.mark.parametrize("spec", ["fora:interval=1", "fora:interval=1,cache=stack", "taylorseer:interval=1"])
def test_rf_edit_under_a_full_compute_cache_is_rf_edit(tiny, batch, spec):
    x, ys, yt = batch
    alone = rf_edit(tiny, x, ys, yt, inject_steps=2, solver="rf2", steps=4)
    cached = rf_edit(tiny, x, ys, yt, inject_steps=2, solver="rf2", steps=4, policy=build_policy(spec))
    torch.testing.assert_close(cached.images, alone.images, rtol=0, atol=0)
    torch.testing.assert_close(cached.noise, alone.noise, rtol=0, atol=0)


def test_rf_edit_without_injection_under_a_cache_is_cached_inversion_and_regeneration(tiny, batch):
    x, ys, yt = batch
    res = rf_edit(tiny, x, ys, yt, inject_steps=0, solver="rf2", steps=4, policy=build_policy("fora:interval=2"))
    ctx = StepContext(block_policy=build_policy("fora:interval=2"))
    z = sample(model_velocity(tiny, ys, ctx=ctx), x, "rf2", schedule=inversion_grid(4), step_context=ctx).x
    out = sample(model_velocity(tiny, yt, ctx=ctx), z, "rf2", schedule=sampling_grid(4), step_context=ctx).x
    torch.testing.assert_close(res.noise, z, rtol=0, atol=0)
    torch.testing.assert_close(res.images, out, rtol=0, atol=0)


def test_values_are_recorded_only_on_calls_the_cache_runs(tiny, batch):
    x, ys, _ = batch
    steps, k = 4, 2
    policy = build_policy("fora:interval=3,schedule=start")  # full on calls 0, 3, 6 of 8
    sharing = value_sharing(tiny, blocks=[0, 1])
    ctx = StepContext(block_policy=policy, hooks=[sharing])
    sharing.plan = lambda i: "record" if i >= steps - k else "off"
    sample(model_velocity(tiny, ys, ctx=ctx), x, "rf2", schedule=inversion_grid(steps), step_context=ctx)
    # Recorded steps 2 and 3 hold calls 4..7, of which only call 6 runs the blocks: step 3's
    # first evaluation (its start edge), on both blocks.
    assert policy.stats.full_calls == 3
    assert sorted((slot, b) for (_, slot, b) in sharing.store) == [("edge0", 0), ("edge0", 1)]
    ((interval, _, _), *_) = sharing.store
    assert interval == pytest.approx((0.75, 1.0))


def test_rf_edit_refuses_a_policy_that_changes_the_tokens(tiny, batch):
    x, ys, yt = batch
    for spec in ("tome:ratio=0.25", "ras"):
        with pytest.raises(ConfigError, match="changes which tokens"):
            rf_edit(tiny, x, ys, yt, inject_steps=1, steps=4, policy=build_policy(spec))


# ----------------------------------------------------------- around each block


class ScaleUpdate:
    """A block hook that scales each block's update: ``x + s (run(x) - x)``."""

    def __init__(self, name, s, log):
        self.name, self.s, self.log = name, s, log

    def block(self, block, x, c_act, ctx, run):
        self.log.append(self.name)
        return x + self.s * (run(x) - x)


def test_block_hooks_nest_in_registration_order(tiny, batch):
    x, y, _ = batch
    t = torch.full((3,), 0.3)
    log = []
    # Outer scales by 2 the update of the inner (which halves it): the block is unchanged.
    ctx = StepContext(hooks=[ScaleUpdate("outer", 2.0, log), ScaleUpdate("inner", 0.5, log)])
    torch.testing.assert_close(tiny(x, t, y, ctx=ctx), tiny(x, t, y), rtol=1e-5, atol=1e-6)
    assert log[:2] == ["outer", "inner"] and len(log) == 2 * len(tiny.blocks)
    # A zero update makes every block the identity: the output is the final layer on the input tokens.
    ctx = StepContext(hooks=[ScaleUpdate("off", 0.0, [])])
    tokens, c_act = tiny.embed(x, t, y)
    expected = tiny.unpatchify(tiny.final_layer(tokens, c_act))
    torch.testing.assert_close(tiny(x, t, y, ctx=ctx), expected, rtol=0, atol=0)


def test_token_merging_hook_is_the_tome_policy_and_composes_with_a_cache(tiny, batch):
    from flowdit.accel import TokenMerging

    x, y, _ = batch
    grid = sampling_grid(6)

    def run(ctx):
        return sample(model_velocity(tiny, y, 1.5, ctx=ctx), x, "euler", schedule=grid, step_context=ctx).x

    as_policy = run(StepContext(block_policy=build_policy("tome:ratio=0.25")))
    as_hook = run(StepContext(hooks=[TokenMerging(0.25)]))
    torch.testing.assert_close(as_hook, as_policy, rtol=0, atol=0)
    # Under a stack cache at full compute the merged blocks run on every call: the same images.
    cached = run(StepContext(block_policy=build_policy("fora:interval=1,cache=stack"), hooks=[TokenMerging(0.25)]))
    torch.testing.assert_close(cached, as_policy, rtol=0, atol=0)
    # With skipping, the cache's full calls merge; the result differs from both parts alone.
    both = run(StepContext(block_policy=build_policy("fora:interval=2,cache=stack"), hooks=[TokenMerging(0.25)]))
    only_cache = run(StepContext(block_policy=build_policy("fora:interval=2,cache=stack")))
    assert (both - only_cache).abs().max() > 1e-4 and (both - as_policy).abs().max() > 1e-4
