"""Training: a tiny end-to-end run on digits, exact resume, divergence handling, the
determinism of each step's draws, 2-process torchrun equivalence, and never losing a run
(non-finite steps, resume rules, the run-directory lock, faults while writing)."""

import errno
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdit.cli import main
from flowdit.train.config import RunConfig
from flowdit.train.trainer import Trainer, TrainingDiverged, global_batch_indices
from flowdit.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowdit.utils.config import load_config

SRC = str(Path(__file__).resolve().parents[1] / "src")

TINY = [
    "model.name=DiT-tiny", "train.batch_size=16", "train.log_every=1", "train.precision=fp32",
    "optim.warmup_steps=2", "sample.steps=2", "sample.solver=euler", "sample.per_class=2", "sample.num_eval=20",
]


def tiny_config(tmp_path, *extra):
    return load_config(RunConfig, None, TINY + [f"out_dir={tmp_path}", *extra])


def _losses(run_dir):
    return [json.loads(l)["loss"] for l in open(Path(run_dir) / "metrics.jsonl")]


def _strict_json_lines(path):
    """Every line of a .jsonl parsed as strict JSON (NaN / Infinity are not JSON)."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def _hashes(root):
    """SHA-256 of every file under ``root``, by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _all_finite(ckpt_dir):
    ckpt = load_checkpoint(ckpt_dir)
    return all(bool(torch.isfinite(v).all()) for g in ckpt.tensors.values() for v in g.values())


def test_end_to_end_train_and_sample_cli(tmp_path, capsys):
    rc = main(["train", "--no-progress", "train.steps=6", "train.ckpt_every=3", *TINY, "sample.cfg=1.25",
               f"out_dir={tmp_path}", "name=e2e"])
    assert rc == 0
    run = tmp_path / "e2e"
    for f in ("config.yaml", "metrics.jsonl", "samples.png", "samples.npz", "metrics.json"):
        assert (run / f).is_file(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_samples"] == 20 and metrics["nfe"] == 2
    # The reported accuracy is the reference classifier's score of samples.npz as saved:
    # recompute it from the file (a wrong image set, label order or quantisation fails).
    from flowdit.data import build_dataset
    from flowdit.eval.classifier import fit_reference_classifier
    from flowdit.utils.images import load_npz

    trn, tst = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    clf = fit_reference_classifier(*trn.batch(torch.arange(len(trn))), *tst.batch(torch.arange(len(tst))), seed=0)
    saved_images, saved_labels = load_npz(run / "samples.npz")
    assert metrics["class_accuracy"] == clf.accuracy(saved_images, saved_labels)
    assert metrics["classifier_test_accuracy"] == clf.test_accuracy > 0.95  # the SVM itself reads real digits
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
    threads = torch.get_num_threads()
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
        torch.set_num_threads(threads)
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
    with pytest.raises(TrainingDiverged, match=f"at step 3: loss nan.* The last finite checkpoint is {good}"):
        tr.fit()
    assert latest_checkpoint(tr.run_dir) == good
    ckpt = load_checkpoint(good)
    assert ckpt.step == 2 and all(torch.isfinite(v).all() for v in ckpt.tensors["model"].values())


def _inject_nan_loss(tr, at_steps):
    """Make the loss NaN on the steps (0-based indices) in ``at_steps``."""
    class NaNAt:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __call__(self, *args, **kwargs):
            loss = self.real(*args, **kwargs)
            return loss * float("nan") if tr.step in at_steps else loss

    tr.objective = NaNAt(tr.objective)


def test_nonfinite_step_is_caught_before_the_update_and_before_any_save(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "name=n", "train.steps=6", "train.ckpt_every=1", "optim.grad_clip=0"),
                 progress=False)
    _inject_nan_loss(tr, {3})
    with pytest.raises(TrainingDiverged) as e:
        tr.fit()
    msg = str(e.value)
    run = tmp_path / "n"
    assert "training diverged at step 4: loss nan, gradient norm nan" in msg
    assert str(run / "checkpoints" / "step_0000003") in msg and "\n" not in msg
    # Nothing was updated: the weights, the EMA and the optimizer are those of step 3's checkpoint.
    ckpt = load_checkpoint(run)
    assert ckpt.step == 3 and tr.step == 3
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, ckpt.tensors["model"][k]), k
    for k, v in tr.ema.state_dict().items():
        assert torch.equal(v, ckpt.tensors["ema"][k]), k
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_0000002", "step_0000003"]  # keep_ckpts=2; nothing written at or after step 4
    assert all(_all_finite(p) for p in (run / "checkpoints").glob("step_*"))
    assert [r["step"] for r in _strict_json_lines(run / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("clip", ["0", "1"])
def test_exploding_run_stops_with_exit_2_and_keeps_only_finite_checkpoints(tmp_path, capsys, clip):
    """The reported probe: lr 1e6 without warm-up; with clipping (the default) it used to end
    with exit 0, NaN samples and 'Infinity' in metrics.jsonl, without it with NaN checkpoints."""
    rc = main(["train", "--no-progress", *TINY, f"out_dir={tmp_path}", "name=x", "train.steps=5",
               "optim.lr=1e6", "optim.warmup_steps=0", f"optim.grad_clip={clip}", "train.ckpt_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    run = tmp_path / "x"
    assert rc == 2 and len(err) == 1
    assert "training diverged at step 3" in err[0] and str(run / "checkpoints" / "step_0000002") in err[0]
    assert not (run / "samples.npz").exists() and not (run / "metrics.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]
    assert all(_all_finite(p) for p in (run / "checkpoints").glob("step_*"))
    assert len(_strict_json_lines(run / "metrics.jsonl")) == 2


def test_nonfinite_steps_are_skipped_and_counted_up_to_the_limit(tmp_path):
    tr = Trainer(tiny_config(tmp_path, "name=s", "train.steps=6", "train.ckpt_every=100",
                             "train.max_nonfinite_steps=2"), progress=False)
    # A finite loss with an infinite gradient (the clipped-explosion case), on steps 2 and 4.
    param = next(tr.model.parameters())
    param.register_hook(lambda g: g * float("inf") if tr.step in (1, 3) else g)
    seen = {}
    real_step = tr.train_step

    def spy():
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        out = real_step()
        if out.get("skipped"):
            seen[tr.step] = all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
        return out

    tr.train_step = spy
    tr.fit()
    assert seen == {2: True, 4: True}  # skipped steps leave the weights untouched
    rows = _strict_json_lines(tmp_path / "s" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None and rows[1]["nonfinite_steps"] == 1
    assert rows[-1]["nonfinite_steps"] == 2 and all(r["loss"] is not None for r in rows if r["step"] in (1, 3, 5, 6))
    assert load_checkpoint(tmp_path / "s").trainer_state["nonfinite_steps"] == 2
    # A third one goes over the limit.
    tr3 = Trainer(tiny_config(tmp_path, "name=s3", "train.steps=6", "train.max_nonfinite_steps=2"), progress=False)
    _inject_nan_loss(tr3, {0, 1, 2})
    with pytest.raises(TrainingDiverged, match=r"at step 3: .*\(2 skipped before, train.max_nonfinite_steps=2\)"):
        tr3.fit()


def _make_nonfinite_copy(src_run, dst_run, group="ema"):
    """A copy of a run whose newest checkpoint's ``group`` weights hold a NaN, with a
    manifest that matches (as a diverged run of an older flowdit could have left it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src_run, dst_run)
    ckpt = latest_checkpoint(dst_run)
    f = ckpt / f"{group}.safetensors"
    sd = load_file(str(f))
    first = next(iter(sd))
    sd[first].view(-1)[0] = float("nan")
    save_file(sd, str(f))
    m = json.loads((ckpt / "manifest.json").read_text())
    b = f.read_bytes()
    m["files"][f.name] = {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
    (ckpt / "manifest.json").write_text(json.dumps(m))
    return ckpt


def test_sample_refuses_a_checkpoint_with_nonfinite_weights(tmp_path, capsys):
    assert main(["train", "--no-progress", "--no-outputs", *TINY, f"out_dir={tmp_path}", "name=r",
                 "train.steps=1"]) == 0
    ckpt = _make_nonfinite_copy(tmp_path / "r", tmp_path / "bad")
    with pytest.raises(Exception, match="non-finite weights"):
        save_checkpoint(tmp_path / "direct", 1, {"ema": {"w": torch.tensor([float("inf")])}})
    assert not (tmp_path / "direct" / "checkpoints" / "step_0000001").exists()
    capsys.readouterr()
    out = tmp_path / "x.png"
    assert main(["sample", "--ckpt", str(tmp_path / "bad"), "--num", "4", "--steps", "1", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "NaN or inf" in err[0] and not out.exists()


# -- resume: the saved config is the source of truth ------------------------------------------


@pytest.fixture(scope="module")
def run6_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("run6")
    assert main(["train", "--no-progress", "--no-outputs", *TINY, f"out_dir={root}", "name=r",
                 "train.steps=6", "train.ckpt_every=2", "train.keep_ckpts=3"]) == 0
    return root / "r"


@pytest.fixture()
def run6(run6_template, tmp_path):
    """A 6-step run with checkpoints at steps 2, 4 and 6 (keep_ckpts=3), a fresh copy per test
    (its config records out_dir as the template's; name and out_dir only locate a run)."""
    import shutil

    shutil.copytree(run6_template, tmp_path / "r")
    return tmp_path / "r"


def test_resume_refuses_a_trajectory_change_and_touches_nothing(run6, capsys):
    before = _hashes(run6)
    capsys.readouterr()
    # The reported probe: lr, batch and keep_ckpts changed on resume (keep_ckpts=1 used to prune).
    rc = main(["train", "--no-progress", "--no-outputs", f"out_dir={run6.parent}", "name=r", "--resume",
               "train.steps=8", "train.keep_ckpts=1", "optim.lr=0.5", "train.batch_size=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "--resume: optim.lr is 0.001 in the run (step_0000006) but 0.5 here" in err[0]
    assert "train.batch_size, train.keep_ckpts" in err[0] and "--allow-config-change" in err[0]
    assert _hashes(run6) == before


def test_resume_without_config_continues_with_the_saved_one_and_records_changes(run6, capsys):
    cfg_before = (run6 / "config.yaml").read_text()
    # No --config and none of the first run's overrides: the saved config is used, only
    # train.steps changes (allowed), and the change is recorded next to the run.
    assert main(["train", "--no-progress", "--no-outputs", f"out_dir={run6.parent}", "--resume", "name=r",
                 "train.steps=8"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "train.steps 6 -> 8" in out
    assert (run6 / "config.yaml").read_text() == cfg_before
    rec = (run6 / "config.resume-1.yaml").read_text()
    assert rec.startswith("# resumed at step 6 with changes:\n#   train.steps: 6 -> 8\n")
    resumed = load_checkpoint(run6)
    assert resumed.step == 8 and resumed.meta["config"]["model"]["name"] == "DiT-tiny"
    assert resumed.meta["config"]["optim"]["lr"] == 1e-3
    # With the flag, a trajectory change is made and recorded.
    assert main(["train", "--no-progress", "--no-outputs", f"out_dir={run6.parent}", "name=r", "--resume",
                 "train.steps=10", "optim.lr=5e-4", "--allow-config-change"]) == 0
    rec2 = (run6 / "config.resume-2.yaml").read_text()
    assert "#   optim.lr: 0.001 -> 0.0005\n" in rec2 and "#   train.steps: 8 -> 10\n" in rec2
    assert load_checkpoint(run6).meta["config"]["optim"]["lr"] == 5e-4
    assert (run6 / "config.yaml").read_text() == cfg_before


def test_fresh_start_on_an_existing_run_is_refused(run6, capsys):
    before = _hashes(run6)
    capsys.readouterr()
    assert main(["train", "--no-progress", *TINY, f"out_dir={run6.parent}", "name=r", "train.steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run6} already holds a run (checkpoints up to step_0000006)" in err[0]
    assert _hashes(run6) == before


def test_damaged_latest_checkpoint_needs_the_fallback_flag(run6, capsys):
    ema = run6 / "checkpoints" / "step_0000006" / "ema.safetensors"
    data = bytearray(ema.read_bytes())
    data[-1] ^= 0xFF
    ema.write_bytes(bytes(data))
    before = _hashes(run6)
    capsys.readouterr()
    args = ["train", "--no-progress", "--no-outputs", f"out_dir={run6.parent}", "name=r", "--resume", "train.steps=8"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ema.safetensors: SHA-256 checksum mismatch" in err[0]
    assert "the newest intact checkpoint is step_0000004: pass --resume-fallback" in err[0]
    assert _hashes(run6) == before
    assert main(args + ["--resume-fallback"]) == 0
    out = capsys.readouterr().out
    assert "step_0000006 is damaged; kept as corrupt-step_0000006" in out and "at step 4" in out
    ck = run6 / "checkpoints"
    assert (ck / "corrupt-step_0000006" / "ema.safetensors").read_bytes() == bytes(data)  # kept as it was
    # keep_ckpts=3 after the resume from step 4: 4, the rewritten 6, and 8.
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_0000004", "step_0000006", "step_0000008"]
    assert load_checkpoint(run6).step == 8 and _all_finite(ck / "step_0000006")


def test_pruning_never_deletes_a_checkpoint_newer_than_the_resumed_one(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"m": {"w": torch.full((2,), float(step))}}, {}, {}, keep_last=None)
    save_checkpoint(tmp_path, 3, {"m": {"w": torch.zeros(2)}}, {}, {}, keep_last=1, protect_after=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_0000003", "step_0000004", "step_0000006"]


def test_trainer_state_missing_a_key_is_one_line(run6, capsys):
    ck = run6 / "checkpoints" / "step_0000006"
    state = torch.load(ck / "trainer_state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, ck / "trainer_state.pt")
    b = (ck / "trainer_state.pt").read_bytes()
    m = json.loads((ck / "manifest.json").read_text())
    m["files"]["trainer_state.pt"] = {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
    (ck / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["train", "--no-progress", "--no-outputs", f"out_dir={run6.parent}", "name=r", "--resume",
                 "train.steps=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flowdit: error: {ck / 'trainer_state.pt'}: trainer state has no 'optimizer'; it cannot "
                   "continue a run"]


def test_relative_data_paths_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    cfg = load_config(RunConfig, None, TINY + ["out_dir=runs", "name=rel", "train.init_from=teacher"]).resolved()
    assert cfg.train.init_from == str(tmp_path / "teacher") and cfg.out_dir == "runs"


# -- the run-directory lock and faults while writing ----------------------------------------


def test_a_locked_run_directory_is_refused_in_one_line(run6, capsys):
    before = _hashes(run6)
    fd = os.open(run6 / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another process holds it
        capsys.readouterr()
        assert main(["train", "--no-progress", "--no-outputs", f"out_dir={run6.parent}", "name=r", "--resume",
                     "train.steps=8"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{run6}: run directory is in use by another flowdit process" in err[0]
    finally:
        os.close(fd)
    assert _hashes(run6) == before


_SLOW_TRAIN = """
import sys, time
sys.path.insert(0, {src!r})
from pathlib import Path
import flowdit.train.checkpoint as C
from flowdit.cli import main
marker = Path({marker!r})
real = C._sync_and_hash
calls = []
def slow(path):
    # Checkpoint files are hashed one by one: signal, then stall inside the write of step {stall_step}.
    if "step_{stall_step:07d}" in str(path):
        marker.write_text("writing")
        time.sleep(60)
    return real(path)
C._sync_and_hash = slow
sys.exit(main({argv!r}))
"""


def _spawn_slow_train(tmp_path, name, stall_step, marker):
    argv = ["train", "--no-progress", "--no-outputs", *TINY, f"out_dir={tmp_path}", f"name={name}",
            "train.steps=6", "train.ckpt_every=2"]
    code = _SLOW_TRAIN.format(src=SRC, marker=str(marker), stall_step=stall_step, argv=argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    return proc, argv


def test_kill_9_during_a_checkpoint_write_loses_nothing_and_leaves_no_stale_lock(tmp_path, capsys):
    """Two processes on one run directory, then a kill -9 inside a checkpoint write."""
    proc, argv = _spawn_slow_train(tmp_path, "k", 4, tmp_path / "marker")
    # This test's process is a second one on the run: the same command, and a resume, are
    # refused at once, naming the holder, and write nothing.
    for second in (argv, ["train", "--no-progress", "--no-outputs", f"out_dir={tmp_path}", "name=k", "--resume"]):
        capsys.readouterr()
        assert main(second) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"flowdit: error: {tmp_path / 'k'}: run directory is in use by another flowdit process "
                       f"(pid {proc.pid}); wait for it to finish or choose another name"]
    assert [r["step"] for r in _strict_json_lines(tmp_path / "k" / "metrics.jsonl")] == [1, 2, 3, 4]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    ck = tmp_path / "k" / "checkpoints"
    assert latest_checkpoint(tmp_path / "k") == ck / "step_0000002"
    assert load_checkpoint(ck / "step_0000002").step == 2  # the previous checkpoint is intact
    assert [p.name for p in ck.iterdir() if p.name.startswith(".tmp-step_0000004")]  # the half-written one
    # The lock died with the process: resume at once, and the crash leftovers are cleaned up.
    assert main(["train", "--no-progress", "--no-outputs", f"out_dir={tmp_path}", "name=k", "--resume"]) == 0
    assert load_checkpoint(tmp_path / "k").step == 6
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("code,hint", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system")])
def test_disk_full_or_read_only_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch,
                                                                                  code, hint):
    import flowdit.train.checkpoint as C

    real = C.save_file

    def failing(sd, path, *a, **k):
        if "step_0000004" in path:
            raise OSError(code, os.strerror(code), path)
        return real(sd, path, *a, **k)

    monkeypatch.setattr(C, "save_file", failing)
    assert main(["train", "--no-progress", "--no-outputs", *TINY, f"out_dir={tmp_path}", "name=f",
                 "train.steps=6", "train.ckpt_every=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("flowdit: error: cannot write or read ") and "step_0000004" in err[0] and hint in err[0]
    ck = tmp_path / "f" / "checkpoints"
    assert latest_checkpoint(tmp_path / "f") == ck / "step_0000002" and _all_finite(ck / "step_0000002")
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]  # the partial write is removed


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
    tr.dist.world_size, tr.dist.rank = 1, 0
    # Gradient accumulation: 4 micro-batches of 4 draw exactly what one batch of 16 draws ...
    acc = Trainer(tiny_config(tmp_path, "name=d4", "train.steps=1", "train.grad_accum=4"), progress=False)
    assert acc.micro_batch == 4 and tr.micro_batch == 16
    for a, b in zip(acc.draw(5), tr.draw(5)):
        assert torch.equal(a, b)
    # ... and one optimizer step over them is the same step, up to the order of float sums.
    torch.testing.assert_close(acc.train_step()["loss"], tr.train_step()["loss"], rtol=1e-6, atol=1e-7)
    for (k, a), b in zip(acc.model.state_dict().items(), tr.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


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
