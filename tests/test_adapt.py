"""Diffscaler adaptation: the Affiner against its formula, what each method trains, the
loop's exact resume, and ``flowdit compress adapt`` end to end."""

from __future__ import annotations

import copy

import torch

from flowdit.compress.adapt import AdaptConfig, adapt, prepare_adapters, stored_model
from flowdit.compress.depth import FlowStream
from flowdit.data.base import ImageDataset
from flowdit.models.adapters import Affiner, add_affiners, adapter_targets, apply_adapters
from flowdit.models.registry import build_model


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("DiT-tiny", 8, 1, 4, depth=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _stream(seed: int = 0):
    g = torch.Generator().manual_seed(5)
    data = ImageDataset(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=g),
                        torch.randint(0, 4, (32,), generator=g), num_classes=4)
    return FlowStream(data, 8, "uniform", 0.1, null_class=4, seed=seed)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=g), torch.rand(6, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])


def test_affiner_starts_at_the_frozen_layer_and_follows_its_formula():
    torch.manual_seed(0)
    lin = torch.nn.Linear(10, 7)
    x = torch.randn(2, 3, 10)
    ref = lin(x).detach()
    aff = Affiner(lin, rank=4)
    assert torch.equal(aff(x), ref)  # a = b' = 0, W_up = 0
    with torch.no_grad():
        for p in aff.trained_parameters():
            p.normal_()
    # y = (1 + a) * (W x) + b + b' + s * W_up ReLU(W_down x), restated.
    expected = ((1 + aff.scale) * (x @ lin.weight.T) + lin.bias + aff.shift
                + aff.gate * (torch.relu(x @ aff.down.T) @ aff.up.T))
    assert torch.allclose(aff(x), expected, atol=1e-5)
    assert not torch.allclose(aff(x), ref, atol=1e-2)
    assert not lin.weight.requires_grad and all(p.requires_grad for p in aff.trained_parameters())


def test_each_method_trains_only_its_parameters_with_the_expected_counts():
    base = _model()
    layers = adapter_targets(base, ("t_embedder",))
    linears = [base.get_submodule(n) for n in layers]
    r = 3
    want = {
        "affiner": sum(3 * m.out_features + r * (m.in_features + m.out_features) for m in linears),
        "lora": sum(r * (m.in_features + m.out_features) for m in linears),
        "full": sum(p.numel() for p in base.parameters()),
    }
    for method, count in want.items():
        model, params, names = prepare_adapters(_model(), AdaptConfig(method=method, rank=r))
        assert sum(p.numel() for p in params) == count, method
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count, method
        assert names == ([] if method == "full" else layers)
        x, t, y = _inputs()
        with torch.no_grad():
            assert torch.allclose(model(x, t, y), base(x, t, y), atol=1e-6), method  # adapters start at zero


def test_adapt_moves_only_the_adapters_and_resumes_exactly():
    cfg = AdaptConfig(method="affiner", rank=2, steps=6, lr=1e-2, warmup_steps=2, ckpt_every=3)
    frozen_before = {k: v.clone() for k, v in _model().state_dict().items()}
    model, ema, log, layers = adapt(_model(), _stream(), cfg, progress=False)
    sd = model.state_dict()
    for name in layers:  # the frozen weights did not move
        assert torch.equal(sd[f"{name}.base.weight"], frozen_before[f"{name}.weight"])
    assert any(sd[f"{n}.up"].abs().sum() > 0 for n in layers)
    saved = {}
    # the callback gets live state dicts (the CLI writes them at once): keep copies
    adapt(_model(), _stream(), cfg, save=lambda s, tens, st: saved.setdefault(s, copy.deepcopy((tens, st))),
          progress=False)
    assert sorted(saved) == [3, 6]
    resumed, ema2, _, _ = adapt(_model(), _stream(), cfg, resume=saved[3], progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ema2.state_dict()[k]), k


def test_stored_forms_reproduce_the_adapted_model():
    x, t, y = _inputs()
    for method in ("affiner", "lora"):
        cfg = AdaptConfig(method=method, rank=2, steps=4, lr=1e-2, warmup_steps=1)
        model, _, _, layers = adapt(_model(), _stream(), cfg, progress=False)
        with torch.no_grad():
            ref = model(x, t, y)
        stored, spec = stored_model(model, cfg, layers)
        fresh = _model(seed=9)
        if spec is not None:
            apply_adapters(fresh, spec)
        fresh.load_state_dict(stored.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.allclose(fresh.eval()(x, t, y), ref, atol=1e-5), method
        assert (spec is None) == (method == "lora")


def test_add_affiners_refuses_a_non_linear():
    model = _model()
    try:
        add_affiners(model, 2, ["blocks.0.norm1"])
    except ValueError as e:
        assert "blocks.0.norm1" in str(e)
    else:
        raise AssertionError("a LayerNorm was wrapped")


# --------------------------------------------------------------------------- CLI

import shutil  # noqa: E402

import pytest  # noqa: E402

from flowdit.cli import main  # noqa: E402
from flowdit.inference import load_run_model  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    assert main(["train", "--no-progress", "model.name=DiT-tiny", "model.depth=2", "train.batch_size=16",
                 "train.precision=fp32", "optim.warmup_steps=2", "sample.steps=2", "sample.solver=euler",
                 "sample.per_class=2", "sample.num_eval=20", f"out_dir={root}", "name=run", "train.steps=2"]) == 0
    return root / "run"


@pytest.mark.parametrize("method", ["affiner", "lora"])
def test_adapt_writes_a_run_that_samples_and_resumes(run, tmp_path, capsys, method):
    out = tmp_path / method
    args = ["compress", "adapt", "--ckpt", str(run), "--out", str(out), "--method", method, "--dataset", "digits",
            "--classes", "0,1,2", "--rank", "2", "--steps", "4", "--ckpt-every", "2", "--batch-size", "8",
            "--no-progress"]
    assert main(args) == 0
    assert "trained parameters of" in capsys.readouterr().out
    model, meta = load_run_model(out)
    assert meta["adapting"]["method"] == method and meta["data"]["classes"] == [0, 1, 2]
    assert any(isinstance(m, Affiner) for m in model.modules()) == (method == "affiner")
    assert main(["sample", "--ckpt", str(out), "--out", str(tmp_path / "s.png"), "-n", "4", "--steps", "2",
                 "--no-progress"]) == 0
    final = {k: v.clone() for k, v in model.state_dict().items()}
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts][-1].endswith("4")
    shutil.rmtree(ckpts[-1])  # a killed run: resume from step 2
    (out / "checkpoints" / "latest").write_text(ckpts[-2].name)
    assert main(args + ["--resume"]) == 0
    again, _ = load_run_model(out)
    assert all(torch.equal(final[k], v) for k, v in again.state_dict().items())


def test_adapt_refuses_bad_input_with_one_line(run, tmp_path, capsys):
    base = ["compress", "adapt", "--ckpt", str(run), "--dataset", "digits", "--no-progress", "--steps", "2"]
    assert main(base + ["--out", str(tmp_path / "a"), "--classes", "0,12"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--classes" in err[0]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x").write_text("keep")
    assert main(base + ["--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and (tmp_path / "b" / "x").read_text() == "keep"
