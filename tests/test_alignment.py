"""Representation-alignment objectives (REPA, SRA): their losses restated from the authors'
code, the block tap, the trainer's training-only heads (optimized, checkpointed, resumed
exactly, never sampled), and the refusals of bad settings."""

import json

import pytest
import torch
import torch.nn.functional as F

from flowdit.cli import main
from flowdit.core.path import interpolate
from flowdit.errors import CheckpointError, ConfigError
from flowdit.inference import load_run_model
from flowdit.models import build_model
from flowdit.train.config import RunConfig
from flowdit.train.objectives.features import block_outputs, tapped_velocity
from flowdit.train.objectives.repa import build_projector, repa_alignment_loss
from flowdit.train.objectives.sra import sra_alignment_loss, sra_teacher_times, sra_weight
from flowdit.train.trainer import Trainer
from flowdit.utils.config import load_config

TINY = [
    "model.name=DiT-tiny", "train.batch_size=16", "train.log_every=1", "train.precision=fp32",
    "optim.warmup_steps=2", "sample.steps=2", "sample.solver=euler", "sample.per_class=2", "sample.num_eval=20",
    "train.sample_every=0",
]


def tiny_config(tmp_path, *extra):
    return load_config(RunConfig, None, TINY + [f"out_dir={tmp_path}", *extra])


# -- the losses, restated from the reference code ------------------------------------------


def reference_repa_proj_loss(zs, zs_tilde):
    """sihyun-yu/REPA ``loss.py`` ``SILoss.__call__``, the projection-loss loop."""
    proj_loss = 0.0
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss += torch.mean(-(z_j * z_tilde_j).sum(dim=-1))
    return proj_loss / (len(zs) * bsz)


def test_repa_loss_equals_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(5, 7, 12, generator=g), torch.randn(5, 7, 12, generator=g)
    assert torch.allclose(repa_alignment_loss(zt, z), reference_repa_proj_loss([z], [zt]), atol=1e-6)
    # Perfect alignment (any positive scale per token) is -1; opposite is +1.
    assert repa_alignment_loss(3 * z, z).item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_alignment_loss(-z, z).item() == pytest.approx(1.0, abs=1e-6)


def test_repa_projector_is_the_reference_mlp():
    mlp = build_projector(32, 64, 10)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]  # models/sit.py build_mlp
    assert [m.weight.shape for m in mlp if hasattr(m, "weight")] == [(64, 32), (64, 64), (10, 64)]
    assert all(float(m.bias.detach().abs().max()) == 0 for m in mlp if hasattr(m, "bias"))


def test_sra_pieces_equal_the_reference():
    # SiT-SRA/loss.py SRALoss: time_input_teacher = clamp(time_input - t_max * rand, 0, 1)
    t, u = torch.tensor([0.05, 0.5, 1.0]), torch.tensor([0.9, 0.5, 0.0])
    assert torch.allclose(sra_teacher_times(t, u, 0.2), torch.tensor([0.0, 0.4, 1.0]))
    # Simpleloss(loss_type="sml1"): smooth_l1_loss(a, b, beta=0.05), the mean over all elements;
    # restated from its definition: 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta.
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    d = (a - b).abs()
    ref = torch.where(d < 0.05, 0.5 * d ** 2 / 0.05, d - 0.025).mean()
    assert torch.allclose(sra_alignment_loss(a, b, "sml1"), ref, atol=1e-6)
    # SiT-SRA/train.py: 2 * 0.1 ** ((epoch - 149) / 1000 + 1) after epoch 149, with steps for epochs.
    assert sra_weight(100, 0.2, 149, 1000) == 0.2
    for e in (150, 700, 1149, 2000):
        assert sra_weight(e, 0.2, 149, 1000) == pytest.approx(2 * 0.1 ** ((e - 149) / 1000 + 1))
    assert sra_weight(10 ** 6, 0.2, None, 1000) == 0.2


# -- the block tap ------------------------------------------------------------------------


def _manual_block_outputs(model, x, t, y):
    tokens, c = model.embed(x, t, y)
    outs = []
    for block in model.blocks:
        tokens = block(tokens, c)
        outs.append(tokens)
    return outs


def test_block_tap_reads_the_outputs_of_the_same_forward():
    torch.manual_seed(0)
    model = build_model("DiT-tiny", 8, 1, 10)
    for p in model.parameters():  # leave adaLN-Zero's identity so that blocks differ
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    v, feats = tapped_velocity(lambda xx, tt, yy, ctx=None: model(xx, tt, yy, ctx=ctx), model, x, t, y, [1, 2])
    manual = _manual_block_outputs(model, x, t, y)
    assert torch.equal(v, model(x, t, y))
    assert torch.equal(feats[1], manual[0]) and torch.equal(feats[2], manual[1])
    feats[1].sum().backward()  # the tapped tokens carry gradients into the model
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[1].attn.qkv.weight.grad is None  # block 2 lies after block 1's output

    calls = []
    model.blocks[1].register_forward_hook(lambda *a: calls.append(1))
    early = block_outputs(model, x, t, y, [1])  # stops after block 1: block 2 never runs
    assert torch.equal(early[1], manual[0]) and calls == []


# -- the objectives in the trainer --------------------------------------------------------


def test_sra_step_loss_equals_a_restatement_of_the_reference(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "flow.objective=sra", "sra.student_block=1", "sra.teacher_block=2"),
                 progress=False)
    obj = tr.objective
    with torch.no_grad():  # a teacher that differs from the student, as after training
        for p in tr.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = tr.draw_step(0)
    x0, eps, t, y, u = b["x0"], b["eps"], b["t"], b["y"], b["extras"]["sra_u"]
    got = obj(tr.velocity, x0, eps, t, y, b["extras"])
    # SRALoss.__call__: student block out_s through the head, EMA teacher block out_t at the
    # earlier time, same images, noise and labels; denoising MSE + 0.2 * smooth L1.
    xt = interpolate(x0, eps, t)
    s_out = _manual_block_outputs(tr.model, xt, t, y)[0]
    tt = (t - 0.2 * u).clamp(0, 1)
    with torch.no_grad():
        t_out = _manual_block_outputs(tr.ema, interpolate(x0, eps, tt), tt, y)[1]
    denoise = ((tr.model(xt, t, y) - (eps - x0)) ** 2).mean()
    ref = denoise + 0.2 * F.smooth_l1_loss(obj.head(s_out), t_out, beta=0.05)
    assert torch.allclose(got, ref, atol=1e-5)
    tr.close()


def test_repa_step_loss_and_cached_targets(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "flow.objective=repa", "repa.block=1", "repa.projector_dim=16"), progress=False)
    obj = tr.objective
    b = tr.draw_step(3)
    # The cached target of each item is the guide's map of that clean image.
    x_items, _ = tr.dataset.batch(b["idx"])
    fmap = obj.encoder(x_items)
    z_ref = fmap.flatten(2).transpose(1, 2)
    assert torch.allclose(b["extras"]["repa_z"].float(), z_ref, atol=2e-3 * z_ref.abs().max())
    got = obj(tr.velocity, b["x0"], b["eps"], b["t"], b["y"], b["extras"])
    xt = interpolate(b["x0"], b["eps"], b["t"])
    h = _manual_block_outputs(tr.model, xt, b["t"], b["y"])[0]
    denoise = ((tr.model(xt, b["t"], b["y"]) - (b["eps"] - b["x0"])) ** 2).mean()
    ref = denoise + 0.5 * reference_repa_proj_loss([b["extras"]["repa_z"].float()], [obj.projector(h)])
    assert torch.allclose(got, ref, atol=1e-5)
    tr.close()


@pytest.mark.parametrize("objective", ["repa", "sra"])
def test_heads_are_trained_checkpointed_and_resumed_exactly(tmp_path, objective):
    extra = ["flow.objective=" + objective, "train.ckpt_every=2", "train.keep_ckpts=5"]
    full = Trainer(tiny_config(tmp_path, *extra, "name=full", "train.steps=4"), progress=False)
    heads0 = {k: v.clone() for k, v in full.heads.state_dict().items()}
    full.fit()
    assert any(not torch.equal(heads0[k], v) for k, v in full.heads.state_dict().items())  # the head learns

    part = Trainer(tiny_config(tmp_path, *extra, "name=part", "train.steps=2"), progress=False)
    part.fit()
    resumed = Trainer(tiny_config(tmp_path, *extra, "name=part", "train.steps=4"), resume=True, progress=False)
    resumed.fit()
    for group in ("model", "ema", "heads"):
        a = getattr(full, group if group != "heads" else "heads").state_dict()
        b = getattr(resumed, group).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), group
    losses = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert f"loss_{objective}" in losses[-1] and "loss_flow" in losses[-1]
    # The run samples like any other: the heads are not part of the model.
    model, meta = load_run_model(tmp_path / "full")
    assert set(model.state_dict()) == set(build_model("DiT-tiny", 8, 1, 10).state_dict())


def test_resume_without_heads_file_is_refused(tmp_path):
    extra = ["flow.objective=repa", "train.ckpt_every=2"]
    Trainer(tiny_config(tmp_path, *extra, "name=r", "train.steps=2"), progress=False).fit()
    step = next((tmp_path / "r" / "checkpoints").glob("step_*"))
    manifest = json.loads((step / "manifest.json").read_text())
    (step / "heads.safetensors").unlink()
    # A checkpoint of a run without heads (as an older flowdit writes): groups model and ema.
    manifest["tensor_groups"].remove("heads")
    manifest["files"] = {k: v for k, v in manifest["files"].items() if "heads" not in k}
    (step / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="no heads.safetensors"):
        Trainer(tiny_config(tmp_path, *extra, "name=r", "train.steps=4"), resume=True, progress=False)


@pytest.mark.parametrize("overrides, needle", [
    (["flow.objective=repa", "repa.encoder=evaluator"], "repa.encoder"),
    (["flow.objective=repa", "repa.encoder=/no/such/dir"], "repa.encoder"),
    (["flow.objective=repa", "repa.weight=-1"], "repa.weight"),
    (["flow.objective=sra", "sra.t_max=1.5"], "sra.t_max"),
    (["flow.objective=sra", "sra.loss=cosine"], "sra.loss"),
])
def test_bad_settings_are_refused_naming_the_key(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        Trainer(tiny_config(tmp_path, *overrides), progress=False)


def test_block_out_of_range_is_one_line_with_exit_2(tmp_path, capsys):
    rc = main(["train", "--no-progress", *TINY, f"out_dir={tmp_path}", "name=x", "train.steps=1",
               "flow.objective=sra", "sra.teacher_block=9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sra.teacher_block" in err[0]
    assert not (tmp_path / "x" / "checkpoints").exists()


@pytest.mark.parametrize("objective", ["repa", "sra"])
def test_alignment_runs_on_a_ddt_and_taps_its_encoder(tmp_path, objective):
    tr = Trainer(tiny_config(tmp_path, "model.name=DDT-tiny", f"flow.objective={objective}", "train.steps=2"),
                 progress=False)
    blocks = [tr.objective.block] if objective == "repa" else [tr.objective.student_block, tr.objective.teacher_block]
    assert all(1 <= b <= len(tr.model.blocks) for b in blocks)
    tr.fit()
    assert set(tr.objective.terms) == {"flow", objective}
    assert all(bool(torch.isfinite(v)) for v in tr.objective.terms.values())


def test_a_model_without_blocks_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="repa.block"):
        Trainer(tiny_config(tmp_path, "model.name=DiCo-tiny", "flow.objective=repa"), progress=False)


def test_repa_aligns_to_a_self_supervised_encoder_directory(tmp_path):
    from flowdit.models.ssl_encoder import load_ssl_encoder
    from flowdit.train.ssl_config import SSLTrainConfig
    from flowdit.train.ssl_encoder import SSLEncoderTrainer

    enc_dir = tmp_path / "enc"
    SSLEncoderTrainer(SSLTrainConfig(dataset="digits", width=8, feature_dim=16, proj_hidden=32, proj_dim=16,
                                     batch_size=32, warmup_steps=2, probe_train=400, probe_test=150,
                                     precision="fp32", device="cpu", out=str(enc_dir), steps=2, ckpt_every=2),
                      progress=False).fit()
    tr = Trainer(tiny_config(tmp_path, "flow.objective=repa", f"repa.encoder={enc_dir}"), progress=False)
    enc = load_ssl_encoder(enc_dir)
    b = tr.draw_step(0)
    x, _ = tr.dataset.batch(b["idx"])
    with torch.no_grad():
        z = enc.feature_map(x).flatten(2).transpose(1, 2)  # [G, 16 tokens, 16 features] on 8x8 digits
    assert b["extras"]["repa_z"].shape == z.shape
    assert torch.allclose(b["extras"]["repa_z"].float(), z, atol=2e-3 * float(z.abs().max()))
    tr.close()
