"""Depth pruning: LoRA, block copies, TinyFusion's gates and masked KD, block importance,
the oracle, the recovery loop and ``flowdit compress prune``."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from flowdit.cli import main
from flowdit.compress.block_importance import block_similarity, importance_keep
from flowdit.compress.depth import FlowStream, calibration_batches, keep_blocks, oracle_subsets, subset_loss
from flowdit.compress.lora import LoRALinear, add_lora, lora_parameters, merge_lora
from flowdit.compress.recovery import RecoveryConfig, feature_targets, recover
from flowdit.compress.tinyfusion import DepthGates, gated_velocity, masked_kd_loss, parse_groups, tinyfusion_search
from flowdit.data.base import ImageDataset
from flowdit.errors import ConfigError
from flowdit.inference import load_run_model
from flowdit.models.registry import build_model


def _model(depth: int = 6, seed: int = 0, scale: float = 0.1):
    """A DiT whose every weight is random (so no block starts as the identity)."""
    torch.manual_seed(seed)
    model = build_model("DiT-tiny", 8, 1, 4, depth=depth).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model


def _stream(batch_size: int = 8, seed: int = 0, dropout: float = 0.1):
    g = torch.Generator().manual_seed(3)
    data = ImageDataset(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g),
                        torch.randint(0, 4, (40,), generator=g), num_classes=4)
    return FlowStream(data, batch_size, "uniform", dropout, null_class=4, seed=seed)


# --------------------------------------------------------------------------- LoRA


def test_lora_starts_at_the_frozen_layer_and_merges_exactly():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 7)
    x = torch.randn(3, 5, 12)
    ref = lin(x).detach()
    lora = LoRALinear(lin, rank=4, alpha=8.0)
    assert torch.equal(lora(x), ref)  # B = 0
    assert not lin.weight.requires_grad and lora.lora_a.requires_grad
    with torch.no_grad():
        lora.lora_b.normal_()
    adapted = lora(x).detach()
    expected = ref + 2.0 * (x @ lora.lora_a.T @ lora.lora_b.T)  # alpha / r = 2
    assert torch.allclose(adapted, expected, atol=1e-5)
    assert not torch.allclose(adapted, ref, atol=1e-3)
    holder = torch.nn.Sequential(lora)
    merge_lora(holder)
    assert isinstance(holder[0], torch.nn.Linear) and holder[0].weight.requires_grad
    assert torch.allclose(holder[0](x), adapted, atol=1e-5)


def test_add_lora_wraps_every_linear_and_dropping_it_restores_the_model():
    model = _model(depth=2)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 3])
    ref = model(x, t, y)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    add_lora(model, rank=2, alpha=4)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == n_linear
    assert len(lora_parameters(model)) == 2 * n_linear
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
    assert not torch.allclose(model(x, t, y), ref, atol=1e-4)
    merge_lora(model, keep_update=False)
    assert torch.equal(model(x, t, y), ref)


# --------------------------------------------------------------------------- block subsets


def test_kept_blocks_equal_gating_the_others_off():
    model = _model()
    b = _stream().batch(0)
    kept = [0, 2, 3, 5]
    small = keep_blocks(model, kept)
    assert len(small.blocks) == 4 and small.config.depth == 4
    masks = torch.zeros(8, 6)
    masks[:, kept] = 1
    with torch.no_grad():
        v_small = small(b.xt, b.t, b.y)
    assert torch.allclose(v_small, gated_velocity(model, masks, b.xt, b.t, b.y), atol=1e-6)
    assert torch.allclose(gated_velocity(model, torch.ones(8, 6), b.xt, b.t, b.y), model(b.xt, b.t, b.y), atol=1e-6)
    loss = float(((v_small - b.target) ** 2).mean())
    assert subset_loss(model, kept, [b]) == pytest.approx(loss, rel=1e-5)
    # per-sample masks: each row of the batch gets its own subset
    masks[0] = torch.tensor([1.0, 1, 1, 1, 0, 0])
    mixed = gated_velocity(model, masks, b.xt, b.t, b.y)
    assert torch.allclose(mixed[0], keep_blocks(model, [0, 1, 2, 3])(b.xt, b.t, b.y)[0], atol=1e-6)
    assert torch.allclose(mixed[1:], v_small[1:], atol=1e-6)
    with pytest.raises(ConfigError, match="distinct"):
        keep_blocks(model, [0, 0, 1])
    with pytest.raises(ConfigError, match="distinct"):
        keep_blocks(model, [1, 6])


def test_oracle_tries_every_subset_best_first():
    model = _model()
    batches = calibration_batches(_stream(), 2)
    ranked = oracle_subsets(model, 3, batches)
    assert len(ranked) == math.comb(6, 3) == 20
    assert len({s for s, _ in ranked}) == 20
    losses = [loss for _, loss in ranked]
    assert losses == sorted(losses)
    assert ranked[0][1] == pytest.approx(subset_loss(model, ranked[0][0], batches))
    full = oracle_subsets(model, 6, batches)
    direct = sum(float(((model(b.xt, b.t, b.y) - b.target) ** 2).sum()) for b in batches) / sum(
        b.xt.numel() for b in batches)
    assert len(full) == 1 and full[0][1] == pytest.approx(direct, rel=1e-5)


def test_flow_stream_is_a_function_of_seed_and_index():
    s = _stream(dropout=0.5)
    a, b = s.batch(7), s.batch(7)
    assert torch.equal(a.xt, b.xt) and torch.equal(a.y, b.y)
    assert not torch.equal(s.batch(8).xt, a.xt)
    assert torch.allclose(a.xt, (1 - a.t.view(-1, 1, 1, 1)) * a.x0 + a.t.view(-1, 1, 1, 1) * a.eps)
    assert torch.equal(a.target, a.eps - a.x0)
    assert (a.y == 4).any() or (s.batch(9).y == 4).any()  # labels dropped to the null class


# --------------------------------------------------------------------------- block importance


def test_block_similarity_is_one_for_identity_blocks_and_matches_cosine():
    fresh = build_model("DiT-tiny", 8, 1, 4, depth=3)  # adaLN-zero: every block is the identity
    batches = calibration_batches(_stream(), 1)
    assert block_similarity(fresh, batches) == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    model = _model(depth=3)
    b = batches[0]
    tokens, c = model.embed(b.x0, b.t, b.y)  # TinyFusion's score: clean latents at a random time
    out = model.blocks[0](tokens, c)
    expected = float(F.cosine_similarity(out, tokens, dim=-1).mean())
    sims = block_similarity(model, batches)
    assert sims[0] == pytest.approx(expected, rel=1e-5) and sims[0] < 0.999
    noised = block_similarity(model, batches, inputs="noised")
    assert noised != sims
    with pytest.raises(ConfigError, match="clean"):
        block_similarity(model, batches, inputs="x")


def test_importance_removes_the_most_input_preserving_blocks_never_the_last():
    scores = [0.5, 0.9, 0.8, 0.2, 0.95, 0.99]
    assert importance_keep(scores, 3) == [0, 3, 5]  # 4, 1, 2 removed; 5 is last, never removed
    assert importance_keep(scores, 6) == list(range(6))
    with pytest.raises(ConfigError):
        importance_keep(scores, 0)


# --------------------------------------------------------------------------- TinyFusion


def test_parse_groups():
    assert parse_groups("1:2", 6) == [(1, 2)] * 3
    assert parse_groups(None, 6, keep=3) == [(3, 6)]
    assert parse_groups("2:3", 6, keep=4) == [(2, 3), (2, 3)]
    for spec, keep, msg in [("1:4", None, "divide"), ("a:b", None, "N:M"), ("1:2", 4, "keep 3"),
                            ("3:2", None, "between")]:
        with pytest.raises(ConfigError, match=msg):
            parse_groups(spec, 6, keep)


def test_gates_choose_n_of_m_and_learn_the_cheapest_blocks():
    gates = DepthGates([(3, 6)])
    assert gates.options[0].shape == (20, 6) and torch.equal(gates.options[0].sum(1), torch.full((20,), 3.0))
    g = torch.Generator().manual_seed(0)
    masks = gates.sample(16, tau=4.0, scaling=100.0, generator=g)
    assert masks.shape == (16, 6) and torch.allclose(masks.sum(1), torch.full((16,), 3.0))
    assert torch.allclose(masks.detach(), masks.detach().round())  # hard in the forward pass
    cost = torch.tensor([3.0, 0.0, 2.0, 0.0, 1.0, 0.0])
    (masks @ cost).mean().backward()
    assert gates.logits[0].grad.abs().sum() > 0  # straight-through: gradients reach the logits
    # trained on a cost per kept block, the gates keep the free ones
    gates = DepthGates([(1, 2)] * 3)
    opt = torch.optim.Adam(gates.parameters(), lr=1e-3)
    for step in range(200):
        loss = (gates.sample(32, tau=4 - 3.9 * step / 199, scaling=100.0, generator=g) @ cost).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gates.decision() == [1, 3, 5]
    assert all(max(p) > 0.9 for p in gates.probabilities(100.0))


def _reference_kd_rep(model_output, teacher_output, target, s_feats, t_feats, beta_feat, alpha_kd):
    """``training_losses_kd_rep`` (VainF/TinyFusion, diffusion/gaussian_diffusion.py), its
    MSE branch restated with ``mean_flat`` inlined."""
    mean_flat = lambda x: x.mean(dim=list(range(1, x.ndim)))
    mse = mean_flat((target - model_output) ** 2)
    feat_loss, cnt = 0, 0
    for sf, tf in zip(s_feats, t_feats):
        var_s, mean_s = torch.var_mean(sf, dim=[1, 2], keepdim=True)
        var_t, mean_t = torch.var_mean(tf, dim=[1, 2], keepdim=True)
        mask_t = (tf - mean_t).abs() < 2 * var_t.sqrt()
        mask_s = (sf - mean_s).abs() < 2 * var_s.sqrt()
        feat_loss += mean_flat((mask_s * sf - mask_t * tf.detach()) ** 2)
        cnt += 1
    kd = mean_flat((model_output - teacher_output) ** 2)
    return alpha_kd * kd + (1 - alpha_kd) * mse + beta_feat * feat_loss / cnt


def test_masked_kd_loss_matches_the_reference():
    torch.manual_seed(0)
    v_s, v_t, target = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    heavy = lambda: torch.randn(4, 16, 32) * torch.where(torch.rand(4, 16, 32) < 0.02, 30.0, 1.0)  # outliers
    fs, ft = [heavy(), heavy()], [heavy(), heavy()]
    ours = masked_kd_loss(v_s, v_t, target, fs, ft, beta_feat=0.01, alpha_kd=0.9)
    ref = _reference_kd_rep(v_s, v_t, target, fs, ft, 0.01, 0.9).mean()
    assert float(ours["loss"]) == pytest.approx(float(ref), rel=1e-6)
    # the masks matter: without them the massive activations dominate the feature term
    unmasked = sum(((a - b) ** 2).mean() for a, b in zip(fs, ft)) / 2
    assert float(ours["feat"]) < 0.5 * float(unmasked)


def test_search_runs_leaves_the_model_alone_and_reports_a_valid_choice():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = tinyfusion_search(model, _stream(), [(1, 2)] * 3, steps=6, lora_rank=2, log_every=3, progress=False)
    assert len(res.kept) == 3 and all(res.kept[i] in (2 * i, 2 * i + 1) for i in range(3))
    assert [s for s, _, _ in res.trace] == [3, 6] and all(math.isfinite(loss) for _, _, loss in res.trace)
    assert all(abs(sum(p) - 1) < 1e-5 and len(p) == 2 for p in res.probabilities)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------- recovery


def test_feature_targets():
    assert feature_targets([0, 2, 4], 6) == [1, 3, 5]  # TinyFusion's 1:2 pairing, student i -> teacher 2i+1
    assert feature_targets([0, 1, 5], 6) == [0, 4, 5]
    assert feature_targets([3], 6) == [5]


def test_recovery_resumes_bit_exactly_and_moves_toward_the_teacher():
    teacher = _model()
    kept = [0, 2, 4]
    stream = _stream()
    cfg = RecoveryConfig(steps=6, lr=1e-3, ckpt_every=3)
    saved = {}
    # state dicts alias the live tensors: a checkpoint is a copy taken at the call
    save = lambda step, tensors, state: saved.__setitem__(step, copy.deepcopy((tensors, state)))
    student, ema, log = recover(keep_blocks(teacher, kept), teacher, kept, stream, cfg, save=save, progress=False)
    assert sorted(saved) == [3, 6] and log[-1]["step"] == 6
    resumed, ema2, log2 = recover(keep_blocks(teacher, kept), teacher, kept, stream, cfg, resume=saved[3],
                                  progress=False)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), resumed.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()))
    assert log2 == log
    # a longer run lowers the distillation loss on held-out states
    b = calibration_batches(stream, 1)[0]
    start = keep_blocks(teacher, kept)
    kd = lambda m: float(((m(b.xt, b.t, b.y) - teacher(b.xt, b.t, b.y)) ** 2).mean())
    trained, _, _ = recover(keep_blocks(teacher, kept), teacher, kept, stream,
                            RecoveryConfig(steps=40, lr=2e-3, ckpt_every=100), progress=False)
    assert kd(trained) < 0.7 * kd(start)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    assert main(["train", "--no-progress", "model.name=DiT-tiny", "model.depth=4", "train.batch_size=16",
                 "train.precision=fp32", "optim.warmup_steps=2", "sample.steps=2", "sample.solver=euler",
                 "sample.per_class=2", "sample.num_eval=20", f"out_dir={root}", "name=run", "train.steps=2"]) == 0
    return root / "run"


def _files(path):
    return {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}


def test_prune_writes_a_run_that_samples_and_resumes(run, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["compress", "prune", "--ckpt", str(run), "--out", str(out), "--method", "importance", "--keep", "2",
            "--recover-steps", "4", "--ckpt-every", "2", "--batch-size", "8", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    sel = json.loads((out / "selection.json").read_text())
    assert sel["method"] == "importance" and len(sel["kept"]) == 2 and sel["kept"][-1] == 3
    assert len(sel["similarity"]) == 4 and f"keeping blocks {sel['kept']}" in printed
    model, meta = load_run_model(out)
    assert len(model.blocks) == 2 and meta["pruning"]["kept"] == sel["kept"]
    assert main(["sample", "--ckpt", str(out), "--out", str(tmp_path / "s.png"), "-n", "4", "--steps", "2",
                 "--no-progress"]) == 0
    final = {k: v.clone() for k, v in model.state_dict().items()}
    # a killed recovery: drop the last checkpoint and resume
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts][-1].endswith("4")
    shutil.rmtree(ckpts[-1])
    (out / "checkpoints" / "latest").write_text(ckpts[-2].name)
    assert main(args + ["--resume"]) == 0
    again, _ = load_run_model(out)
    assert all(torch.equal(final[k], v) for k, v in again.state_dict().items())


def test_prune_with_tinyfusion_and_index(run, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["compress", "prune", "--ckpt", str(run), "--out", str(out), "--keep", "2", "--groups", "1:2",
                 "--search-steps", "3", "--recover-steps", "0", "--batch-size", "4", "--no-progress"]) == 0
    sel = json.loads((out / "selection.json").read_text())
    assert sel["method"] == "tinyfusion" and sel["groups"] == [[1, 2], [1, 2]] and len(sel["probabilities"]) == 2
    out2 = tmp_path / "i"
    assert main(["compress", "prune", "--ckpt", str(run), "--out", str(out2), "--method", "index", "--kept", "0,3",
                 "--recover-steps", "0", "--no-progress"]) == 0
    pruned, _ = load_run_model(out2)
    full, _ = load_run_model(run)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1])
    assert torch.allclose(pruned(x, t, y), keep_blocks(full, [0, 3])(x, t, y), atol=1e-6)


def _one_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowdit: error:"), err
    for n in needles:
        assert n in err[0], err[0]


def test_prune_refusals(run, tmp_path, capsys):
    out = tmp_path / "p"
    base = ["compress", "prune", "--ckpt", str(run), "--no-progress", "--batch-size", "4"]
    assert main(base + ["--out", str(out), "--method", "index", "--kept", "1,2", "--recover-steps", "2"]) == 0
    capsys.readouterr()
    before = _files(out)
    assert main(base + ["--out", str(out), "--method", "index", "--kept", "1,2"]) == 2
    _one_error(capsys, "--out", "--resume")
    assert main(base + ["--out", str(out), "--method", "index", "--kept", "1,2", "--recover-steps", "3",
                        "--resume"]) == 2
    _one_error(capsys, "--out", "other settings")
    assert main(base + ["--out", str(out), "--method", "oracle", "--keep", "2", "--resume"]) == 2
    _one_error(capsys, "--method")
    assert before == _files(out)
    for extra, needle in [(["--method", "index"], "--kept"), (["--keep", "4"], "--keep"),
                          (["--keep", "2", "--groups", "1:3"], "divide"), (["--kept", "0,x"], "--kept"),
                          (["--method", "index", "--kept", "0,7"], "distinct"), (["--keep", "0"], "--keep")]:
        assert main(base + ["--out", str(tmp_path / "new")] + extra) == 2, extra
        _one_error(capsys, needle)
        assert not (tmp_path / "new").exists()
    assert main(base + ["--out", str(tmp_path / "x"), "--ckpt", str(tmp_path / "missing"), "--keep", "2"]) == 2
    _one_error(capsys, "missing")
