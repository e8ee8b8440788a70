"""RAS against a restatement of the authors' code (microsoft/RAS).

The reference pieces restated below, each in a few lines and in the reference's order:
- ``ref_schedule``: ``src/ras/utils/ras_manager.py``, ``generate_skip_token_list`` (static
  dropping) and ``increase_step`` (``is_RAS_step`` / ``is_next_RAS_step``).
- ``ref_selection``: ``src/ras/schedulers/ras_scheduling_flow_match_euler_discrete.py``,
  ``RASFlowMatchEulerDiscreteScheduler.ras_selection`` (one image, ``metric="std"``).
- ``ref_sample``: the same file's ``step`` (cached patches of the guided velocity replaced by
  the stored ones, Euler update, next selection), ``src/ras/modules/stable_diffusion_3/
  transformer_forward.py`` ``ras_forward`` (only the selected tokens enter the blocks, zeros
  elsewhere before the scheduler overwrites them) and ``src/ras/modules/attention_processor.py``
  ``RASJointAttnProcessor2_0`` (key/value cache set at step ``start - 1`` and at the dense
  steps, updated at the recomputed tokens on RAS steps).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowdit.accel import RAS, build_policy
from flowdit.errors import ConfigError
from flowdit.models.attention import merge_heads, qkv_heads
from flowdit.models.registry import build_model
from flowdit.sampling.context import StepContext
from flowdit.sampling.guidance import cfg_velocity
from flowdit.sampling.sample import sample
from flowdit.sampling.schedules import shifted

# ras_manager / ras_argparser defaults
START, END, RESET, SAMPLE_RATIO, STARVATION, HIGH_RATIO, STEPS = 4, 30, (12, 22), 0.5, 0.1, 1.0, 30


def ref_schedule(num_steps, n_patches, start=START, end=END, reset=RESET, ratio=SAMPLE_RATIO):
    """ras_manager: skip counts per step, and is_RAS_step / is_next_RAS_step per step."""
    avg_skip = int((1 - ratio) * n_patches)
    skip = [avg_skip for _ in range(num_steps)]
    for i in reset:
        skip[i] = 0
    for i in range(start):
        skip[i] = 0
    is_ras = [s >= start and s <= end and s not in reset for s in range(num_steps)]
    is_next = [s + 1 >= start and s + 1 < end and s + 1 not in reset for s in range(num_steps)]
    return skip, is_ras, is_next


def ref_selection(diff, drop_cnt, patch, skip, high_ratio=HIGH_RATIO, starvation=STARVATION, metric="std"):
    """ras_selection for one image: diff [1, C, H, W]; updates drop_cnt [N] in place;
    returns (cached patch indices, recomputed patch indices)."""
    _, _, height, width = diff.shape
    diff = diff.squeeze(0).permute(1, 2, 0)
    per_pixel = torch.std(diff, dim=-1) if metric == "std" else torch.norm(diff, p=2, dim=-1)
    metric = per_pixel.view(height // patch, patch, width // patch, patch).transpose(-2, -3).mean(-1).mean(-1).view(-1)
    metric *= torch.exp(starvation * drop_cnt)
    indices = torch.sort(metric, dim=0, descending=False).indices
    low_bar = int(skip * (1 - high_ratio))
    high_bar = int(skip * high_ratio)
    cached = torch.cat([indices[:low_bar], indices[-high_bar:]])
    other = indices[low_bar:-high_bar]
    drop_cnt[cached] += 1
    return cached, other


def fields(steps, b=1, c=4, side=16, seed=0):
    """A sequence of velocity fields with a slowly moving, spatially uneven spread, so that
    the ranking changes from step to step and the drop counts matter."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(b, 1, side, side, generator=g) * 2 + 0.2
    drift = torch.rand(b, 1, side, side, generator=g) - 0.5
    base = torch.randn(b, c, side, side, generator=g)
    out = []
    for s in range(steps):
        base = 0.9 * base + 0.45 * torch.randn(b, c, side, side, generator=g)
        out.append(base * (amp + 0.05 * s * drift))
    return out


def run_selection_parity(policy, n_steps=STEPS, b=1, high_ratio=HIGH_RATIO, starvation=STARVATION, metric="std"):
    """Drive flowdit's schedule and selection and the reference's on the same fields; return
    the number of selections compared."""
    p, side = 2, 16
    n_patches = (side // p) ** 2
    ts = shifted(n_steps, dtype=torch.float64).tolist()
    skip, is_ras, is_next = ref_schedule(n_steps, n_patches)
    drop = [torch.zeros(n_patches) - (n_steps + 1) for _ in range(b)]  # _init_ras_config: - len(sigmas)
    compared = 0
    for s, v in enumerate(fields(n_steps, b=b)):
        assert policy.is_ras_call(s, n_steps) == is_ras[s], s
        assert policy.is_ras_call(s + 1, n_steps) == (is_next[s] and s + 1 < n_steps), s
        if not is_next[s]:
            continue
        dt = ts[s + 1] - ts[s]
        ours = policy.choose(v, p, dt, n_steps)
        for i in range(b):
            _, other = ref_selection(dt * v[i:i + 1], drop[i], p, skip[s + 1], high_ratio, starvation, metric)
            assert set(ours[i].tolist()) == set(other.tolist()), (s, i)
        compared += 1
    return compared


def test_selection_matches_reference_every_step():
    assert run_selection_parity(RAS()) == 24  # RAS steps 4..29 without 12 and 22, selected one step ahead


def test_selection_matches_reference_per_image_and_high_ratio():
    assert run_selection_parity(RAS(), b=3) == 24
    assert run_selection_parity(RAS(high_ratio=0.5), high_ratio=0.5) == 24
    assert run_selection_parity(RAS(metric="l2norm"), metric="l2norm") == 24


def test_starvation_changes_the_selection_on_these_fields():
    # Without this the parity above could not see a wrong drop count.
    a, b = RAS(), RAS(starvation=0.0)
    differs = 0
    for s, v in enumerate(fields(STEPS)):
        if a.is_ras_call(s + 1, STEPS):
            differs += set(a.choose(v, 2, -1 / STEPS, STEPS)[0].tolist()) != set(b.choose(v, 2, -1 / STEPS, STEPS)[0].tolist())
    assert differs >= 5


def test_default_caches_the_highest_scores_and_paper_text_the_lowest():
    v = fields(1)[0]
    code, paper = RAS().choose(v, 2, -0.1, STEPS)[0], RAS(select="paper_text").choose(v, 2, -0.1, STEPS)[0]
    score = RAS().score(v, 2, -0.1)[0]
    top = set(score.argsort(descending=True)[:32].tolist())
    assert set(paper.tolist()) == top and set(code.tolist()) == set(range(64)) - top


def test_steps_scale_to_the_run():
    ras = RAS()
    assert [k for k in range(30) if ras.is_ras_call(k, 30)] == [k for k in range(4, 30) if k not in (12, 22)]
    # 50 calls: RAS from call round(4 * 50 / 30) = 7, dense calls 20 and round(36.67) = 37.
    assert [k for k in range(50) if not ras.is_ras_call(k, 50)] == list(range(7)) + [20, 37]
    own = RAS(warmup=2, dense="5/8", ref_steps=10)
    assert [k for k in range(10) if not own.is_ras_call(k, 10)] == [0, 1, 5, 8]
    assert [k for k in range(20) if not RAS(dense="none").is_ras_call(k, 20)] == [0, 1, 2]


# -- a whole sampling run against the restated reference loop -----------------------------


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("DiT-tiny", input_size=16, in_channels=4, num_classes=3)
    with torch.no_grad():  # adaLN-Zero starts as the identity; random weights give every block work
        for prm in m.parameters():
            prm.add_(0.2 * torch.randn_like(prm))
    return m.eval()


class RefKVProcessor:
    """RASJointAttnProcessor2_0's key/value cache for one layer (non-fused path)."""

    def __init__(self, mgr):
        self.mgr, self.k_cache, self.v_cache = mgr, None, None

    def __call__(self, attn, x, ctx=None):
        q, k, v = qkv_heads(attn, x)
        if self.mgr["step"] == 0:
            self.k_cache = self.v_cache = None
        if self.mgr["step"] == START - 1 or self.mgr["step"] in RESET:
            self.k_cache, self.v_cache = k.clone(), v.clone()  # the reference's own projections; here views of one
        if self.mgr["is_ras"]:
            self.k_cache[:, :, self.mgr["other"]] = k
            self.v_cache[:, :, self.mgr["other"]] = v
            k, v = self.k_cache, self.v_cache
        return attn.proj(merge_heads(F.scaled_dot_product_attention(q, k, v)))


def latent_index(patch_idx, height, p=2):
    """extract_latents_index_from_patched_latents_index (patch size 2, square latents)."""
    flat = patch_idx // (height // p) * p * height + patch_idx % (height // p) * p
    return (flat[:, None] + torch.tensor([0, height + 1, 1, height])[None, :]).flatten()


@torch.no_grad()
def ref_sample(model, noise, y, scale, n_steps=STEPS):
    """The reference pipeline on one image: batched CFG, RAS scheduler step, RAS forward."""
    p, (C, H, W) = model.patch_size, noise.shape[1:]
    n_patches = (H // p) * (W // p)
    ts = shifted(n_steps, dtype=torch.float64).tolist()
    skip, is_ras, is_next = ref_schedule(n_steps, n_patches)
    mgr = {"step": 0, "is_ras": False, "other": None}
    saved = [blk.attn.processor for blk in model.blocks]
    for blk in model.blocks:
        blk.attn.processor = RefKVProcessor(mgr)
    drop = torch.zeros(n_patches) - len(ts)
    x, cached_index, cached_noise = noise.clone(), None, None
    yy = torch.cat([y, torch.full_like(y, model.null_class)])
    try:
        for s in range(n_steps):
            mgr.update(step=s, is_ras=is_ras[s])
            t = torch.full((2,), ts[s], dtype=torch.float32)
            tokens, c_act = model.embed(torch.cat([x, x]), t, yy)
            if is_ras[s]:
                tokens = tokens[:, mgr["other"]]
            for blk in model.blocks:
                tokens = blk(tokens, c_act, None)
            out = model.final_layer(tokens, c_act)
            if is_ras[s]:
                full = torch.zeros(2, n_patches, out.shape[-1])
                full[:, mgr["other"]] = out
                out = full
            v = model.unpatchify(out)
            v = v[1:] + scale * (v[:1] - v[1:])
            if is_ras[s]:
                v.squeeze(0).view(C, -1)[:, cached_index] = cached_noise
            diff = (ts[s + 1] - ts[s]) * v
            x = x + diff
            if is_next[s]:
                cached, other = ref_selection(diff, drop, p, skip[s + 1])
                cached_index = latent_index(cached, H)
                cached_noise = v.squeeze(0).view(C, -1)[:, cached_index]
                mgr["other"] = other
    finally:
        for blk, proc in zip(model.blocks, saved):
            blk.attn.processor = proc
    return x


def flowdit_sample(model, noise, y, scale, policy, n_steps=STEPS, record=None):
    ctx = StepContext(block_policy=policy)
    fn = cfg_velocity(model, y, model.null_class, scale, ctx=ctx)
    if record is not None:
        inner = fn

        def fn(x, t):
            v = inner(x, t)
            record.append(v.clone())
            return v
    return sample(fn, noise, solver="euler", steps=n_steps, step_context=ctx).x


def test_final_sample_matches_reference_loop(model):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([2])
    ref = ref_sample(model, noise, y, 2.0)
    policy = RAS()
    out = flowdit_sample(model, noise, y, 2.0, policy)
    assert policy.stats.calls == STEPS and policy.stats.full_calls == 6  # steps 0-3, 12, 22
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    uncached = flowdit_sample(model, noise, y, 2.0, None)
    assert (out - uncached).norm() > 1e-3 * uncached.norm()  # the test would see a no-op cache


def test_cached_patches_keep_the_previous_guided_velocity(model):
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    vs, policy = [], RAS(cfg="split")
    flowdit_sample(model, noise, torch.tensor([0, 1]), 1.5, policy, record=vs)
    kept = 0
    for k in range(1, STEPS):
        if not policy.is_ras_call(k, STEPS):
            continue
        same = (vs[k] == vs[k - 1]).reshape(2, 4, 8, 2, 8, 2).all(dim=(1, 3, 5))  # per 2x2 patch
        assert (same.sum(dim=(1, 2)) == 32).all(), k  # the 32 cached patches of each image, exactly
        kept += 1
    assert kept == 24


@pytest.mark.parametrize("cfg_mode", ["batched", "split"])
def test_ratio_one_recomputes_every_token_and_equals_uncached(model, cfg_mode):
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 2])
    policy = build_policy(f"ras:ratio=1,cfg={cfg_mode}")
    out = flowdit_sample(model, noise, y, 2.0, policy, n_steps=10)
    assert policy.stats.full_calls < policy.stats.calls  # went through the partial path
    torch.testing.assert_close(out, flowdit_sample(model, noise, y, 2.0, None, n_steps=10), atol=1e-5, rtol=0)


def test_one_channel_model_needs_l2norm():
    gray = build_model("DiT-tiny", input_size=8, in_channels=1, num_classes=3).eval()
    noise, y = torch.randn(1, 1, 8, 8), torch.tensor([1])
    with pytest.raises(ConfigError, match="metric=std is the std over the channels .* has 1; use metric=l2norm"):
        flowdit_sample(gray, noise, y, 2.0, RAS(), n_steps=6)
    policy = RAS(metric="l2norm")
    flowdit_sample(gray, noise, y, 2.0, policy, n_steps=6)
    assert policy.stats.full_calls < policy.stats.calls


def test_spec_errors_and_roundtrip():
    with pytest.raises(ConfigError, match="dense must be step indices"):
        build_policy("ras:dense=12/x")
    with pytest.raises(ConfigError, match="high_ratio applies to select=code"):
        build_policy("ras:select=paper_text,high_ratio=0.5")
    with pytest.raises(ConfigError, match="select must be one of code, paper_text"):
        build_policy("ras:select=paper")
    p = build_policy("ras:dense=22/12,warmup=3,metric=l2norm")
    assert p.dense == "12/22" and repr(build_policy(repr(p))) == repr(p)
