"""Bad invocations of the command line: each one exits with status 2 and exactly one line on
stderr that names the offending key, flag or file, without a traceback, before any work,
and leaves every file of the existing runs as it was. Then the command-line conventions:
overrides anywhere, --version, --print-config, --list-keys, defaults and solver lists in
--help, evaluator weights written outside the package, damaged cached statistics."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdit.cli import build_parser, main

TINY = ["model.name=DiT-tiny", "train.batch_size=16", "train.log_every=1", "train.precision=fp32",
        "optim.warmup_steps=2", "sample.steps=2", "sample.solver=euler", "sample.per_class=2", "sample.num_eval=20"]


def _tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (the cache of reference statistics aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.relative_to(root).parts}


def _rewrite(ckpt: Path, fname: str) -> None:
    """Make the manifest of ``ckpt`` agree with the current bytes of ``fname``."""
    b = (ckpt / fname).read_bytes()
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][fname] = {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
    (ckpt / "manifest.json").write_text(json.dumps(m))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo refused",))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One tiny trained run (2 steps, a checkpoint per step, final samples), damaged copies
    of it, and bad input files; built once for the module."""
    root = tmp_path_factory.mktemp("cli")
    saved_cache = os.environ.get("FLOWDIT_CACHE")
    os.environ["FLOWDIT_CACHE"] = str(root / "cache")
    runs = root / "runs"
    assert main(["train", "--no-progress", *TINY, f"out_dir={runs}", "name=run", "train.steps=2",
                 "train.ckpt_every=1"]) == 0
    run = runs / "run"
    newest = lambda r: r / "checkpoints" / "step_0000002"  # noqa: E731

    def copy(name):
        shutil.copytree(run, runs / name)
        return newest(runs / name)

    m = copy("unk")
    (m / "manifest.json").write_text(json.dumps(dict(json.loads((m / "manifest.json").read_text()), extra_key=1)))
    m = copy("ver0")
    (m / "manifest.json").write_text(json.dumps(dict(json.loads((m / "manifest.json").read_text()),
                                                     format_version=0)))
    m = copy("pick")
    buf = io.BytesIO()
    torch.save({"step": 2, "x": _Evil()}, buf)
    (m / "trainer_state.pt").write_bytes(buf.getvalue())
    _rewrite(m, "trainer_state.pt")
    m = copy("tsmiss")
    state = torch.load(m / "trainer_state.pt", weights_only=True)
    del state["torch_rng"]
    torch.save(state, m / "trainer_state.pt")
    _rewrite(m, "trainer_state.pt")
    m = copy("corrupt")
    data = bytearray((m / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (m / "model.safetensors").write_bytes(bytes(data))
    m = copy("nan")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(m / "ema.safetensors"))
    next(iter(sd.values())).view(-1)[0] = float("nan")
    save_file(sd, str(m / "ema.safetensors"))
    _rewrite(m, "ema.safetensors")

    files = root / "files"
    files.mkdir()
    (files / "afile").write_text("not a directory")
    (files / "bad.yaml").write_text("model: [1, 2\n")
    z = np.load(run / "samples.npz")
    np.savez(files / "empty.npz", arr_0=np.zeros((0, 8, 8, 1), np.uint8), arr_1=np.zeros((0,), np.int64))
    for name, value in (("lab99", 99), ("labm1", -1)):
        labels = z["arr_1"].copy()
        labels[3] = value
        np.savez(files / f"{name}.npz", arr_0=z["arr_0"], arr_1=labels)
    yield {"root": root, "runs": runs, "run": run, "files": files, "npz": run / "samples.npz",
           "afile": files / "afile", "out": root / "out"}
    if saved_cache is None:
        os.environ.pop("FLOWDIT_CACHE", None)
    else:
        os.environ["FLOWDIT_CACHE"] = saved_cache


T = ["train", "--no-progress", "--no-outputs"]
S = ["sample", "--ckpt", "{run}", "--num", "4", "--steps", "1", "--no-progress", "--out", "{out}/x.png"]
ED = ["edit", "--ckpt", "{run}", "--input", "{npz}", "--steps", "1", "--out", "{out}/e.png"]

# (argv, what the one line must name). {names} are paths from the fixture.
CASES = [
    # train: the config, validated as a whole before anything is read or written
    (T + TINY + ["out_dir={runs}", "name=new", "train.stepz=3"], "train.stepz"),
    (T + TINY + ["out_dir={runs}", "name=new", "optim.lr=fast"], "optim.lr"),
    (T + TINY + ["out_dir={runs}", "name=new", "optim.lr=nan"], "optim.lr"),
    (T + TINY + ["out_dir={runs}", "name=new", "optim.lr=inf"], "optim.lr"),
    (T + TINY + ["out_dir={runs}", "name=new", "optim.betas=[0.9,2]"], "optim.betas[1]"),
    (T + TINY + ["out_dir={runs}", "name=new", "optim.weight_decay=-1"], "optim.weight_decay"),
    (T + TINY + ["out_dir={runs}", "name=new", "optim.grad_clip=nan"], "optim.grad_clip"),
    (T + TINY + ["out_dir={runs}", "name=new", "train.seed=-1"], "train.seed"),
    (T + TINY + ["out_dir={runs}", "name=new", "train.keep_ckpts=0"], "train.keep_ckpts"),
    (T + TINY + ["out_dir={runs}", "name=new", "sample.solver=bogus", "train.sample_every=1"], "sample.solver"),
    (T + TINY + ["out_dir={runs}", "name=new", "sample.cfg=-2"], "sample.cfg"),
    (T + TINY + ["out_dir={runs}", "name=new", "model.name=DiT-nope"], "model.name"),
    (T + TINY + ["out_dir={runs}", "name=new", "model.patch_size=3"], "model.patch_size"),
    (T + TINY + ["out_dir={runs}", "name=new", "flow.time_sampler=foo"], "flow.time_sampler"),
    (T + TINY + ["out_dir={runs}", "name=new", "data.dataset=cifar"], "data.dataset"),
    (T + TINY + ["out_dir={runs}", "name=new", "train.batch_size=0"], "train.batch_size"),
    (T + TINY + ["out_dir={runs}", "name=new", "--device", "gpu"], "--device"),
    (T + TINY + ["out_dir={runs}", "name=new", "--device", "cuda:99"], "--device"),
    (T + ["--config", "{files}/missing.yaml", "out_dir={runs}"], "missing.yaml"),
    (T + ["--config", "{files}/bad.yaml", "out_dir={runs}"], "bad.yaml"),
    (T + TINY + ["out_dir={afile}/x", "name=new"], "out_dir"),
    (T + TINY + ["out_dir=/sys/flowdit-test", "name=new"], "out_dir"),
    (T + TINY + ["out_dir={runs}", "name=new", "--resum"], "--resum"),
    (T + TINY + ["out_dir={runs}", "name=run"], "{run}"),
    # train --resume: the saved config is the source of truth; damaged checkpoints
    (T + ["out_dir={runs}", "name=run", "--resume", "optim.lr=0.5"], "optim.lr"),
    (T + ["out_dir={runs}", "name=run", "--resume", "train.batch_size=32"], "train.batch_size"),
    (T + ["out_dir={runs}", "name=run", "--resume", "train.keep_ckpts=1"], "train.keep_ckpts"),
    (T + ["out_dir={runs}", "name=run", "--resume", "train.steps=1"], "train.steps"),
    (T + ["out_dir={runs}", "name=unk", "--resume"], "extra_key"),
    (T + ["out_dir={runs}", "name=ver0", "--resume"], "format version 0"),
    (T + ["out_dir={runs}", "name=pick", "--resume"], "trainer_state.pt: this file contains code"),
    (T + ["out_dir={runs}", "name=tsmiss", "--resume"], "'torch_rng'"),
    (T + ["out_dir={runs}", "name=corrupt", "--resume"], "model.safetensors"),
    # sample
    (S[:-1] + ["{out}/x.jpg"], "--out"),
    (S + ["--num", "0"], "--num"),
    (S + ["--seed", "-1"], "--seed"),
    (S + ["--batch-size", "0"], "--batch-size"),
    (S + ["--batch-size", "-1"], "--batch-size"),
    (S + ["--solver", "dopri5", "--tol", "0"], "--tol"),
    (S + ["--solver", "dopri5", "--tol", "-1"], "--tol"),
    (S + ["--cfg", "-2"], "--cfg"),
    (S + ["--cfg", "nan"], "--cfg"),
    (S + ["--solver", "bogus"], "--solver"),
    (S + ["--steps", "0"], "--steps"),
    (S + ["--classes", "3,99"], "--classes"),
    (S + ["--guidance-interval", "0.9,0.1"], "--guidance-interval"),
    (S + ["--shift", "0"], "--shift"),
    (S + ["--device", "cuda:99"], "--device"),
    (S + ["--accel", "bogus"], "--accel 'bogus'"),
    (S[:2] + ["{runs}/missing"] + S[3:], "missing"),
    (S[:2] + ["{runs}/nan"] + S[3:], "NaN or inf"),
    (S[:2] + ["{runs}/unk"] + S[3:], "extra_key"),
    (S[:-1] + ["{afile}/x.png"], "--out"),
    (S[:-1] + ["/sys/flowdit-test/x.png"], "--out"),
    # eval
    (["eval", "--samples", "{files}/empty.npz", "--dataset", "digits"], "empty.npz"),
    (["eval", "--samples", "{files}/lab99.npz", "--dataset", "digits"], "lab99.npz: label 99"),
    (["eval", "--samples", "{files}/labm1.npz", "--dataset", "digits"], "labm1.npz: label -1"),
    (["eval", "--samples", "{npz}", "--dataset", "mnist"], "--data-root"),
    (["eval", "--samples", "{npz}"], "--dataset"),
    (["eval", "--samples", "{npz}", "--dataset", "digits", "--out", "{afile}/e.json"], "--out"),
    (["eval", "--samples", "{files}/missing.npz", "--dataset", "digits"], "missing.npz"),
    (["eval", "--samples", "{run}", "--weights-dir", "{files}/noweights"], "noweights"),
    # edit / invert / restore / evaluator
    (ED + ["--target", "99"], "--target"),
    (ED + ["--target", "10"], "--target"),  # the null class is no target
    (ED + ["--target", "3", "--method", "rf-inversion", "--eta-steps", "x"], "--eta-steps"),
    (["invert", "--ckpt", "{run}", "--input", "{npz}", "--solver", "dopri5", "--out", "{out}/z.npz"], "--solver"),
    (["restore", "--ckpt", "{run}", "--input", "{npz}", "--task", "inpaint", "--class", "10", "--out",
      "{out}/r.png"], "--class"),
    (["evaluator", "train", "--dataset", "mnist", "--out-dir", "{out}/ev"], "--data-root"),
    (["evaluator", "train", "--dataset", "digits", "--kinds", "foo", "--out-dir", "{out}/ev"], "--kinds"),
    (["nosuch"], "nosuch"),
]


def _sys_read_only() -> bool:
    """True where no file can be created in /sys (a folder read-only even for root)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir="/sys"):
            return False
    except OSError:
        return True


_SYS_READ_ONLY = _sys_read_only()


def _fill(arg: str, env: dict) -> str:
    return arg.format(**{k: str(v) for k, v in env.items()})


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("argv,names", CASES, ids=[f"{i:02d}-{c[1]}"[:40] for i, c in enumerate(CASES)])
def test_bad_invocation_is_one_line_exit_2_and_changes_nothing(env, capsys, argv, names):
    if "/sys/" in " ".join(argv) and not _SYS_READ_ONLY:
        pytest.skip("/sys is not a read-only folder here")
    before = _tree(env["root"])
    capsys.readouterr()
    rc = main([_fill(a, env) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured
    assert len(lines) == 1, lines
    assert lines[0].startswith("flowdit") and "error:" in lines[0]
    assert _fill(names, env) in lines[0], lines[0]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert _tree(env["root"]) == before  # no run file changed, nothing created (new run, --out)


# -- conventions -------------------------------------------------------------------------------


def test_overrides_anywhere_version_and_print_config(env, tmp_path, capsys):
    import yaml

    from flowdit import __version__

    capsys.readouterr()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flowdit {__version__}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sample:\n  cfg: 2.0\n")
    # Overrides before and after other options; on --resume the recipe's keys and the
    # overrides are laid over the saved config; printed instead of run.
    assert main(["train", "--config", str(recipe), f"out_dir={env['runs']}", "--resume", "name=run",
                 "--print-config", "train.steps=9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    saved = yaml.safe_load((env["run"] / "config.yaml").read_text())
    assert printed["sample"]["cfg"] == 2.0 and printed["train"]["steps"] == 9
    assert printed["train"]["batch_size"] == saved["train"]["batch_size"] == 16
    assert printed["model"] == saved["model"] and printed["optim"] == saved["optim"]
    assert main(["train", f"out_dir={env['runs']}", "--print-config", "name=run", "--resume"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == saved
    # The same overrides after a flag really train (the case that used to fail).
    assert main(["train", "--no-progress", "--no-outputs", f"out_dir={tmp_path}", *TINY, "--device", "cpu",
                 "name=a", "--no-progress", "train.steps=1"]) == 0
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["train"]["steps"] == 1


def test_list_keys_gives_every_key_a_type_default_and_help(capsys):
    from flowdit.train.config import RunConfig
    from flowdit.utils.config import describe_keys

    capsys.readouterr()
    assert main(["train", "--list-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = describe_keys(RunConfig)
    assert len(lines) == len(rows) > 50
    for row, line in zip(rows, lines):
        assert row["help"] and line.split()[0] == row["key"] and row["type"] in line and row["help"] in line
    by_key = {r["key"]: r for r in rows}
    assert by_key["optim.lr"]["default"] == 1e-3 and by_key["optim.lr"]["type"] == "float"
    assert by_key["train.max_nonfinite_steps"]["default"] == 0


def _commands(parser, prefix=()):
    """(command path, parser) for every command and sub-action of the CLI."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


def test_every_option_has_help_and_shows_its_default():
    import argparse

    from flowdit.sampling.sample import ADAPTIVE_METHODS
    from flowdit.sampling.solvers import SOLVERS

    for path, sub in _commands(build_parser()):
        fmt = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):  # a list of commands, each with its help
                continue
            assert action.help, (path, action.option_strings or action.dest)
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in fmt._get_help_string(action), (path, action.dest)
    sample_help = dict(_commands(build_parser()))[("sample",)].format_help()
    assert "(default: 16)" in " ".join(sample_help.split())
    flat = " ".join(sample_help.split())
    for name in list(SOLVERS) + list(ADAPTIVE_METHODS):  # the registry, not a copied list
        assert name in flat


def test_evaluator_train_writes_outside_the_package_by_default(tmp_path, monkeypatch, capsys):
    from flowdit.eval.evaluator import WEIGHTS_DIR

    shipped = {p.name: p.read_bytes() for p in WEIGHTS_DIR.iterdir()}
    monkeypatch.chdir(tmp_path)
    assert main(["evaluator", "train", "--dataset", "digits", "--epochs", "1", "--no-progress"]) == 0
    assert "flowdit eval --weights-dir evaluators" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in WEIGHTS_DIR.iterdir()} == shipped
    manifest = json.loads((tmp_path / "evaluators" / "manifest.json").read_text())
    assert set(manifest) == {"digits/evaluator", "digits/guide"}
    assert main(["evaluator", "train", "--dataset", "digits", "--replace-shipped", "--out-dir", "x"]) == 2


def test_damaged_cached_reference_statistics_are_recomputed(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOWDIT_CACHE", str(tmp_path / "cache"))
    out1, out2 = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["eval", "--samples", str(env["npz"]), "--dataset", "digits", "--out", str(out1)]) == 0
    cached = sorted((tmp_path / "cache" / "reference").glob("*evaluator*.npz"))
    assert len(cached) == 1
    cached[0].write_bytes(cached[0].read_bytes()[:1000])  # a crash while it was written
    capsys.readouterr()
    assert main(["eval", "--samples", str(env["npz"]), "--dataset", "digits", "--out", str(out2)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cached[0]) in err[0] and "damaged" in err[0] and "recomputing" in err[0]
    a, b = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert a["fid"] == b["fid"] and a["precision"] == b["precision"]
    with np.load(cached[0]) as z:  # replaced by a whole file
        assert z["features"].shape == (1438, 128)
