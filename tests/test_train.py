"""Training: a tiny end-to-end run on digits, exact resume, divergence handling, the
determinism of each step's draws, and 2-process torchrun equivalence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdit.cli import main
from flowdit.train.config import RunConfig
from flowdit.train.trainer import Trainer, TrainingDiverged, global_batch_indices
from flowdit.train.checkpoint import latest_checkpoint, load_checkpoint
from flowdit.utils.config import load_config

TINY = [
    "model.name=DiT-tiny", "train.batch_size=16", "train.log_every=1", "train.precision=fp32",
    "optim.warmup_steps=2", "sample.steps=2", "sample.solver=euler", "sample.per_class=2", "sample.num_eval=20",
]


def tiny_config(tmp_path, *extra):
    return load_config(RunConfig, None, TINY + [f"out_dir={tmp_path}", *extra])


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in open(Path(run_dir) / "metrics.jsonl")]


def test_end_to_end_train_and_sample_cli(tmp_path, capsys):
    rc = main(["train", "--no-progress", "train.steps=6", "train.ckpt_every=3", *TINY, "sample.cfg=1.25",
               f"out_dir={tmp_path}", "name=e2e"])
    assert rc == 0
    run = tmp_path / "e2e"
    for f in ("config.yaml", "metrics.jsonl", "samples.png", "samples.npz", "metrics.json"):
        assert (run / f).is_file(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 20 and metrics["nfe"] == 2
    assert 0.0 <= metrics["class_accuracy"] <= 1.0
    npz = np.load(run / "samples.npz")
    assert npz["arr_0"].shape == (20, 8, 8, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].dtype == np.int64

    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(run), "--num", "6", "--classes", "3,4", "--solver", "heun", "--steps", "2",
                 "--seed", "1", "--out", str(out), "--no-progress"]) == 0
    z = np.load(out)
    assert z["arr_0"].shape == (6, 8, 8, 1) and list(z["arr_1"]) == [3, 3, 3, 4, 4, 4]
    # Same seed, same samples.
    out2 = tmp_path / "s2.npz"
    main(["sample", "--ckpt", str(run), "--num", "6", "--classes", "3,4", "--solver", "heun", "--steps", "2",
          "--seed", "1", "--out", str(out2), "--no-progress"])
    assert np.array_equal(np.load(out2)["arr_0"], z["arr_0"])
    png = tmp_path / "g.png"
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--num", "4", "--steps", "1", "--out", str(png), "--no-progress"]) == 0
    assert png.stat().st_size > 0
    # Without --cfg the run's own guidance scale is used, not a fixed default.
    assert "cfg 1.25)" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--no-progress", "train.stepz=3", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.stepz" in err[0]
    assert main(["train", "--no-progress", "optim.lr=fast", f"out_dir={tmp_path}"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert "error" in capsys.readouterr().err
    assert main(["sample", "--ckpt", str(tmp_path), "--out", str(tmp_path / "x.jpg")]) == 2
    assert ".png" in capsys.readouterr().err


def test_resume_continues_the_same_run_exactly(tmp_path):
    torch.set_num_threads(1)  # bitwise-repeatable reductions
    try:
        a = Trainer(tiny_config(tmp_path, "name=a", "train.steps=8", "train.ckpt_every=100"), progress=False)
        a.fit()
        b = Trainer(tiny_config(tmp_path, "name=b", "train.steps=4", "train.ckpt_every=100"), progress=False)
        b.fit()
        b2 = Trainer(tiny_config(tmp_path, "name=b", "train.steps=8", "train.ckpt_every=100"), resume=True, progress=False)
        assert b2.step == 4
        b2.fit()
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    for which in ("model", "ema"):
        wa = load_checkpoint(tmp_path / "a").tensors[which]
        wb = load_checkpoint(tmp_path / "b").tensors[which]
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (which, k)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "name=nan", "train.steps=4", "train.ckpt_every=2"), progress=False)
    tr.cfg.train.steps = 2
    tr.fit()
    good = latest_checkpoint(tr.run_dir)
    with torch.no_grad():
        tr.model.final_layer.linear.bias.fill_(float("nan"))
    tr.cfg.train.steps = 4
    with pytest.raises(TrainingDiverged, match="step 2"):
        tr.fit()
    assert latest_checkpoint(tr.run_dir) == good
    ckpt = load_checkpoint(good)
    assert ckpt.step == 2 and all(torch.isfinite(v).all() for v in ckpt.tensors["model"].values())


def test_batch_indices_are_epoch_permutations():
    N, G = 10, 4
    seq = torch.cat([global_batch_indices(s, G, N, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(seq[:10].tolist()) == list(range(N)) and sorted(seq[10:20].tolist()) == list(range(N))
    assert not torch.equal(seq[:10], seq[10:20])
    assert torch.equal(global_batch_indices(2, G, N, seed=3), seq[8:12])


def test_step_draws_do_not_depend_on_world_size_or_accumulation(tmp_path):
    cfg = tiny_config(tmp_path, "name=d", "train.steps=1")
    tr = Trainer(cfg, progress=False)
    x0, y, eps, t, idx = tr.draw(5)
    # A 2-process run gives rank 1 the second half of the very same global batch.
    tr.dist.world_size, tr.dist.rank = 2, 1
    x0b, yb, epsb, tb, idxb = tr.draw(5)
    assert torch.equal(idxb, idx[8:]) and torch.equal(epsb, eps[8:]) and torch.equal(tb, t[8:]) and torch.equal(yb, y[8:])


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    common = ["--no-progress", "--no-outputs", *TINY, "train.steps=4", "train.ckpt_every=100",
              f"out_dir={tmp_path}", "data.dataset=digits"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "flowdit.cli", "train", *common, "name=one"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          "-m", "flowdit.cli", "train", *common, "name=two"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6)
    wa = load_checkpoint(tmp_path / "one").tensors["model"]
    wb = load_checkpoint(tmp_path / "two").tensors["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, capsys):
    def broken_compile(module, *a, **k):
        def fn(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    tr = Trainer(tiny_config(tmp_path, "name=c", "train.steps=2", "train.compile=true"), progress=False)
    tr.fit()
    assert tr.step == 2 and "running eager" in capsys.readouterr().out
