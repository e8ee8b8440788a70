"""The self-supervised encoder (``flowdit encoder train``): NT-Xent against the SimCLR
formula, shapes, determinism, exact resume after a kill, the linear probe, the checksummed
loader and the command line's refusals. Small networks on the embedded digits."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from flowdit.cli.main import main
from flowdit.errors import FlowditError
from flowdit.models.ssl_encoder import SSLEncoder, SSLEncoderArch, load_ssl_encoder
from flowdit.train.ssl_config import SSLTrainConfig
from flowdit.train.ssl_encoder import SSLEncoderTrainer, augment, linear_probe, nt_xent

TINY = dict(dataset="digits", width=8, feature_dim=16, proj_hidden=32, proj_dim=16, batch_size=32,
            warmup_steps=2, probe_train=400, probe_test=150, precision="fp32", device="cpu")
TINY_FLAGS = ["--width", "8", "--feature-dim", "16", "--proj-hidden", "32", "--proj-dim", "16", "--batch-size", "32",
              "--probe-train", "400", "--probe-test", "150", "--precision", "fp32", "--device", "cpu", "--no-progress"]


def _cfg(out, **kw) -> SSLTrainConfig:
    return SSLTrainConfig(**{**TINY, "out": str(out), **kw})


def _weights(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "encoder.safetensors"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ssl") / "run"
    metrics = SSLEncoderTrainer(_cfg(out, steps=4, ckpt_every=2), progress=False).fit()
    return out, metrics


def test_nt_xent_equals_the_simclr_formula_by_hand():
    # SimCLR (Chen et al. 2020, Algorithm 1): views 2k-1 and 2k of image k (interleaved here,
    # unlike nt_xent's [z1; z2] layout), s_ij = cosine similarity,
    # l(i, j) = -log exp(s_ij / tau) / sum_{m != i} exp(s_im / tau),
    # L = 1 / (2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)].
    g = torch.Generator().manual_seed(3)
    n, d, tau = 3, 5, 0.2
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    views = [v for k in range(n) for v in (z1[k], z2[k])]

    def s(a, b):
        return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))

    def loss(i, j):
        denom = sum(math.exp(s(views[i], views[m]) / tau) for m in range(2 * n) if m != i)
        return -math.log(math.exp(s(views[i], views[j]) / tau) / denom)

    by_hand = sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(by_hand, rel=1e-6)
    # identical, perfectly separated pairs give the lowest loss
    eye = torch.eye(n, d)
    assert float(nt_xent(eye, eye, tau)) < float(nt_xent(z1, z2, tau))


def test_feature_map_shapes_and_pooled_features():
    mnist = SSLEncoder(SSLTrainConfig().arch(1, 28))
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    fmap = mnist.feature_map(x)
    assert fmap.shape == (2, 96, 7, 7) and mnist.stride == 4 and mnist.feature_dim == 96
    assert torch.allclose(mnist.features(x), fmap.mean(dim=(2, 3)))
    assert sum(p.numel() for p in mnist.parameters()) < 400_000
    digits = SSLEncoder(SSLTrainConfig().arch(1, 8))
    assert digits.feature_map(torch.zeros(3, 1, 8, 8)).shape == (3, 96, 4, 4)
    rgb = SSLEncoder(SSLEncoderArch(3, (8, 16, 32, 64)))
    assert rgb.feature_map(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 8, 8)
    with pytest.raises(ValueError, match="stride"):
        mnist.feature_map(torch.zeros(1, 1, 30, 30))


def test_views_are_seeded_and_stay_in_range():
    cfg = SSLTrainConfig()
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(1), cfg)
    b = augment(x, torch.Generator().manual_seed(1), cfg)
    c = augment(x, torch.Generator().manual_seed(2), cfg)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    plain = dataclasses.replace(cfg, crop_min=1.0, crop_max=1.0, rotate=0.0, translate=0.0, erase_p=0.0, noise=0.0,
                                aspect=1.0)
    assert torch.allclose(augment(x, torch.Generator().manual_seed(1), plain), x, atol=1e-5)  # identity warp


def test_same_seed_same_weights(trained_run, tmp_path):
    run, _ = trained_run
    SSLEncoderTrainer(_cfg(tmp_path / "again", steps=4, ckpt_every=2), progress=False).fit()
    w1, w2 = _weights(run), _weights(tmp_path / "again")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    SSLEncoderTrainer(_cfg(tmp_path / "other", steps=4, seed=1), progress=False).fit()
    w3 = _weights(tmp_path / "other")
    assert not all(torch.equal(w1[k], w3[k]) for k in w1)


def test_resume_after_a_kill_equals_an_uninterrupted_run(trained_run, tmp_path, monkeypatch):
    run, metrics = trained_run
    out = tmp_path / "killed"
    real_step = SSLEncoderTrainer.train_step

    def dies_at_step_3(self):
        if self.step == 3:  # after the checkpoint of step 2, in the middle of the run
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(SSLEncoderTrainer, "train_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        SSLEncoderTrainer(_cfg(out, steps=4, ckpt_every=2), progress=False).fit()
    assert not (out / "encoder.safetensors").exists()
    monkeypatch.setattr(SSLEncoderTrainer, "train_step", real_step)
    with pytest.raises(FlowditError, match="--resume"):  # a second start without --resume is refused
        SSLEncoderTrainer(_cfg(out, steps=4, ckpt_every=2), progress=False)
    with pytest.raises(FlowditError, match="--temperature"):  # and so is a resume that changes the loss
        SSLEncoderTrainer(_cfg(out, steps=4, ckpt_every=2, temperature=0.5), resume=True, progress=False)
    resumed = SSLEncoderTrainer(_cfg(out, steps=4, ckpt_every=2), resume=True, progress=False).fit()
    w1, w2 = _weights(run), _weights(out)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert resumed["linear_probe"] == metrics["linear_probe"]


def test_linear_probe_separates_separable_features_and_runs_on_the_encoder(trained_run):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 4
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + torch.randn(400, 8, generator=g)
    r = linear_probe(x[:300], y[:300], x[300:], y[300:], num_classes=4)
    assert r["test_accuracy"] > 0.95 and r["train_size"] == 300 and r["test_size"] == 100
    chance = linear_probe(torch.randn(300, 8, generator=g), y[:300], torch.randn(100, 8, generator=g), y[300:], 4)
    assert chance["test_accuracy"] < 0.5
    _, metrics = trained_run
    for key in ("linear_probe", "linear_probe_random_init"):
        assert 0.1 < metrics[key]["test_accuracy"] <= 1.0 and metrics[key]["test_size"] == 150
    assert metrics["feature_map"] == [16, 4, 4]


def test_loader_returns_a_frozen_encoder_and_refuses_damaged_files(trained_run, tmp_path):
    run, _ = trained_run
    enc = load_ssl_encoder(run)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert enc.feature_map(torch.zeros(2, 1, 8, 8)).shape == (2, 16, 4, 4)
    assert torch.equal(load_ssl_encoder(run / "encoder.safetensors").stem[0].weight, enc.stem[0].weight)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["arch"]["widths"] == [8, 16] and len(manifest["sha256"]) == 64

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    weights = copy / "encoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    for bad in (copy, weights):
        with pytest.raises(FlowditError) as e:
            load_ssl_encoder(bad)
        assert str(weights) in str(e.value) and "\n" not in str(e.value) and "SHA-256" in str(e.value)
    weights.unlink()
    with pytest.raises(FlowditError, match="missing"):
        load_ssl_encoder(copy)
    with pytest.raises(FlowditError, match="manifest"):
        load_ssl_encoder(tmp_path / "nowhere")


@pytest.mark.parametrize("argv, flag", [
    (["--steps", "0"], "--steps"),
    (["--steps", "two"], "--steps"),
    (["--dataset", "cifar"], "--dataset"),
    (["--temperature", "nan"], "--temperature"),
    (["--stride", "3"], "--stride"),
    (["--crop-min", "0.9", "--crop-max", "0.5"], "--crop-min"),
    (["--dataset", "mnist", "--root", "/nonexistent/mnist"], "--root"),
    (["--device", "tpu"], "--device"),
    (["--bogus-flag", "1"], "--bogus-flag"),
])
def test_cli_refuses_a_bad_flag_in_one_line_with_exit_2(tmp_path, capsys, argv, flag):
    out = tmp_path / "run"
    rc = main(["encoder", "train", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert not out.exists()  # refused before any work


def test_cli_trains_and_resumes_with_the_saved_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["encoder", "train", "--out", str(out), "--steps", "2", *TINY_FLAGS]) == 0
    assert "linear probe test accuracy" in capsys.readouterr().out
    assert main(["encoder", "train", "--out", str(out), "--steps", "2", "--no-progress"]) == 2  # an existing run
    assert "--resume" in capsys.readouterr().err
    # settings not given again come from the run's config.yaml
    assert main(["encoder", "train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["feature_map"] == [16, 4, 4]
    assert load_ssl_encoder(out).feature_dim == 16
