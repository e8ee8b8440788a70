"""muP for the DiT (flowdit.models.mup): parameter kinds and per-group learning rates, the
zero readout and its multiplier, the initialisation, the coordinate check (flat in width
under muP, growing under the standard parametrisation), the trainer's groups and exact
resume, and existing models left as they were."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowdit.errors import ConfigError
from flowdit.inference import load_run_model
from flowdit.models import build_model
from flowdit.models.dit import DiT, DiTConfig, modulate
from flowdit.models.mup import (coord_check, coord_slopes, mup_config, mup_param_groups, mup_parameter_kinds,
                                width_mult)
from flowdit.train.checkpoint import load_checkpoint
from flowdit.train.config import RunConfig
from flowdit.train.trainer import Trainer
from flowdit.utils.config import load_config

HIDDEN = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight", "adaLN_modulation.1.weight")


def _dit(width=128, base=32, heads_of=32, **kw):
    cfg = DiTConfig(input_size=8, in_channels=1, patch_size=2, hidden_size=width, depth=2, num_heads=width // heads_of,
                    num_classes=10, **kw)
    return DiT(mup_config(cfg, base) if base else cfg)


def test_existing_models_keep_their_config_and_plain_readout():
    for name in ("DiT-digits", "DiT-mnist", "DiT-tiny", "DiT-S/2"):
        with torch.device("meta"):
            m = build_model(name, 8 if "digits" in name or "tiny" in name else 28 if "mnist" in name else 32,
                            1, 10)
        d = m.config_dict()
        assert "mup_base_width" not in d and "mup_output_mult" not in d
        assert set(d) == {"input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                          "mlp_ratio", "num_classes", "qk_norm", "time_scale"}
        assert m.final_layer.input_mult is None
    # A saved config (without the new keys) rebuilds the same model config.
    m = build_model("DiT-tiny", 8, 1, 10)
    assert DiT(DiTConfig(**m.config_dict())).config_dict() == m.config_dict()
    # Standard init: adaLN-Zero and a zero readout, Xavier hidden weights.
    assert torch.count_nonzero(m.blocks[0].adaLN_modulation[1].weight) == 0


def test_config_keys_round_trip_and_are_validated():
    m = DiT(mup_config(_dit(128, None).config, 32, 2.0))
    d = m.config_dict()
    assert d["mup_base_width"] == 32 and d["mup_output_mult"] == 2.0
    assert DiT(DiTConfig(**d)).config_dict() == d
    assert m.final_layer.input_mult == pytest.approx(2.0 * 32 / 128)
    with pytest.raises(ConfigError, match="mup_output_mult"):
        DiTConfig(input_size=8, in_channels=1, num_classes=10, mup_output_mult=2.0).validate()
    with pytest.raises(ConfigError, match="mup_base_width"):
        DiTConfig(input_size=8, in_channels=1, num_classes=10, mup_base_width=0).validate()
    with pytest.raises(ConfigError, match="class-conditional DiTs"):
        load_config(RunConfig, None, ["model.name=MMDiT-shapes", "text.encoder=hash", "data.dataset=shapes",
                                      "model.mup_base_width=64"])
    cfg = load_config(RunConfig, None, ["model.mup_base_width=64"])
    assert cfg.model.overrides() == {"mup_base_width": 64}


def test_hidden_matrices_get_base_over_width_learning_rate():
    lr, wd = 1e-3, 0.1
    for width in (64, 128, 256):
        m = _dit(width, base=64)
        kinds = mup_parameter_kinds(m)
        hidden = {n for n, k in kinds.items() if k == "hidden"}
        expected = {f"blocks.{i}.{h}" for i in range(2) for h in HIDDEN}
        expected |= {"t_embedder.mlp.2.weight", "final_layer.adaLN_modulation.1.weight"}
        assert hidden == expected
        assert kinds["final_layer.linear.weight"] == "readout"
        for n in ("x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
                  "blocks.0.attn.qkv.bias", "final_layer.linear.bias"):
            assert kinds[n] in ("input", "fixed"), n
        groups = mup_param_groups(m, lr, wd)
        by = {g["mup"]: g for g in groups}
        assert by["hidden"]["lr"] == pytest.approx(lr * 64 / width)
        assert by["hidden"]["lr_scale"] == pytest.approx(64 / width)
        assert by["hidden"]["weight_decay"] == pytest.approx(wd * width / 64)
        assert by["vector"]["lr"] == lr and by["vector"]["lr_scale"] == 1.0 and by["vector"]["weight_decay"] == wd
        ids = {id(p) for g in groups for p in g["params"]}
        assert len(ids) == len(list(m.parameters())) == sum(len(g["params"]) for g in groups)
        assert width_mult(m.config) == width / 64


def test_qk_norm_gains_are_fixed_and_keep_the_base_rate():
    m = _dit(64, base=32, qk_norm=True)
    kinds = mup_parameter_kinds(m)
    assert kinds["blocks.0.attn.q_norm.weight"] == "fixed"


def test_readout_is_zero_with_its_multiplier_and_init_variances_follow_fan_in():
    torch.manual_seed(0)
    m = _dit(256, base=64)
    assert torch.count_nonzero(m.final_layer.linear.weight) == 0
    assert torch.count_nonzero(m.final_layer.linear.bias) == 0
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 10, (4,))
    assert torch.count_nonzero(m(x, t, y)) == 0
    # MuReadout: linear(output_mult * h / m).
    with torch.no_grad():
        m.final_layer.linear.weight.normal_()
        tokens, c_act = m.embed(x, t, y)
        tokens = m.run_blocks(tokens, c_act)
        shift, scale = m.final_layer.adaLN_modulation[1](c_act).chunk(2, dim=-1)
        h = modulate(m.final_layer.norm_final(tokens), shift, scale)
        expect = m.final_layer.linear(h * (64 / 256))
        assert torch.allclose(m.final_layer(tokens, c_act), expect)
    # N(0, 1 / fan_in) for hidden and input weights, adaLN included (no adaLN-Zero); N(0, 1) labels.
    for w, fan_in in ((m.blocks[0].attn.qkv.weight, 256), (m.blocks[0].mlp.fc2.weight, 1024),
                      (m.blocks[0].adaLN_modulation[1].weight, 256), (m.t_embedder.mlp[0].weight, 256),
                      (m.x_embedder.proj.weight, 4)):
        assert float(w.detach().std()) == pytest.approx(fan_in**-0.5, rel=0.1)
    assert float(m.y_embedder.embedding_table.weight.detach().std()) == pytest.approx(1.0, rel=0.15)
    assert float(m.blocks[0].attn.qkv.bias.detach().abs().max()) == 0.0


@pytest.fixture(scope="module")
def digits_batch():
    from flowdit.data import build_dataset

    ds = build_dataset("digits")
    return ds.batch(torch.arange(64))


@pytest.fixture(scope="module")
def coords(digits_batch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x0, y = digits_batch
        kw = dict(widths=(32, 64, 128, 256), head_dim=32, depth=2, steps=4, lr=1e-2, seeds=(0, 1))
        return coord_check(x0, y, 10, mup=True, **kw), coord_check(x0, y, 10, mup=False, **kw)
    finally:
        torch.set_num_threads(threads)


def test_coordinate_check_is_flat_in_width_under_mup(coords):
    mup, _ = coords
    assert mup["widths"] == [32, 64, 128, 256] and mup["base_width"] == 32
    for step in (1, 2, 3, 4):
        slopes = coord_slopes(mup, step)
        assert abs(slopes["block"]) < 0.2, (step, slopes)
        assert abs(slopes["output"]) < 0.2, (step, slopes)
        assert max(abs(v) for v in slopes.values()) < 0.3, (step, slopes)
    for kind, per_width in mup["l1"].items():  # finite, order-one activations
        assert all(0.01 < v[-1] < 10 for v in per_width), kind


def test_coordinate_check_grows_with_width_under_standard_parametrisation(coords):
    _, sp = coords
    # One Adam step moves every readout entry by about lr: its output grows like the width.
    assert coord_slopes(sp, 1)["output"] > 0.8
    slopes = coord_slopes(sp, 4)
    assert slopes["block"] > 0.5 and slopes["output"] > 0.3, slopes
    assert slopes["mlp_out"] > 0.5 and slopes["attn_out"] > 0.5, slopes


TINY = [
    "model.name=DiT-tiny", "model.mup_base_width=16", "train.batch_size=16", "train.log_every=1",
    "train.precision=fp32", "optim.warmup_steps=2", "optim.weight_decay=0.01", "sample.steps=2",
    "sample.solver=euler", "sample.per_class=2", "sample.num_eval=20",
]


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "metrics.jsonl")]


def test_trainer_builds_mup_groups_and_resumes_exactly(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def cfg(*extra):
        return load_config(RunConfig, None, TINY + [f"out_dir={tmp_path}", *extra])

    try:
        a = Trainer(cfg("name=a", "train.steps=6", "train.ckpt_every=100"), progress=False)
        groups = {g["mup"]: g for g in a.optimizer.param_groups}
        assert groups["hidden"]["lr_scale"] == pytest.approx(16 / 32)
        assert groups["hidden"]["weight_decay"] == pytest.approx(0.02)
        a.train_step()
        assert groups["hidden"]["lr"] == pytest.approx(a.lr_at(0) * 0.5)
        assert groups["vector"]["lr"] == pytest.approx(a.lr_at(0))
        a.close()
        a = Trainer(cfg("name=a", "train.steps=6", "train.ckpt_every=100"), progress=False)
        a.fit()
        b = Trainer(cfg("name=b", "train.steps=3", "train.ckpt_every=100"), progress=False)
        b.fit()
        b2 = Trainer(cfg("name=b", "train.steps=6", "train.ckpt_every=100"), resume=True, progress=False)
        assert b2.step == 3
        b2.fit()
    finally:
        torch.set_num_threads(threads)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    for which in ("model", "ema"):
        wa = load_checkpoint(tmp_path / "a").tensors[which]
        wb = load_checkpoint(tmp_path / "b").tensors[which]
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (which, k)
    # The saved model config carries muP: the loaded model has the readout multiplier.
    model, meta = load_run_model(tmp_path / "a")
    assert meta["model_config"]["mup_base_width"] == 16
    assert model.final_layer.input_mult == pytest.approx(0.5)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert torch.isfinite(model(x, t, y)).all()


def test_standard_run_keeps_one_group_at_the_scheduled_rate(tmp_path):
    cfg = load_config(RunConfig, None, [t for t in TINY if "mup" not in t] + [f"out_dir={tmp_path}", "name=s"])
    tr = Trainer(cfg, progress=False)
    try:
        assert len(tr.optimizer.param_groups) == 1 and "lr_scale" not in tr.optimizer.param_groups[0]
        tr.train_step()
        assert tr.optimizer.param_groups[0]["lr"] == tr.lr_at(0)
    finally:
        tr.close()


def test_objective_heads_keep_the_base_learning_rate(tmp_path):
    cfg = load_config(RunConfig, None, TINY + [f"out_dir={tmp_path}", "name=h", "flow.objective=sra"])
    tr = Trainer(cfg, progress=False)
    try:
        assert tr.heads is not None
        groups = {g["mup"]: g for g in tr.optimizer.param_groups}
        assert {id(p) for p in groups["heads"]["params"]} == {id(p) for p in tr.heads.parameters()}
        tr.train_step()
        assert groups["heads"]["lr"] == tr.lr_at(0) and groups["hidden"]["lr"] == pytest.approx(tr.lr_at(0) / 2)
    finally:
        tr.close()
