"""Training objectives are pluggable: the registry chooses one by the documented rules, a new
one registered from outside is trained by the unchanged trainer, unknown names are refused."""

from __future__ import annotations

import pytest
import torch

from flowdit.cli import main
from flowdit.core.path import interpolate
from flowdit.errors import ConfigError
from flowdit.train.config import RunConfig
from flowdit.train.objectives import (
    FIRST_OBJECTIVE_STREAM,
    OBJECTIVES,
    Distillation,
    FlowMatching,
    RectifiedFlowPP,
    SlimFlow,
    TrainingObjective,
    register_objective,
    select_objective,
)
from flowdit.train.trainer import Trainer
from flowdit.utils.config import load_config

TINY = ["model.name=DiT-tiny", "train.batch_size=8", "train.precision=fp32", "train.log_every=1",
        "optim.warmup_steps=0", "train.ckpt_every=100"]


class WeightedNoiseRegression(TrainingObjective):
    """A toy objective: flow matching weighted per sample by ``w ~ U(0, 1)`` from its own
    stream, on noise halved by ``couple``: ``mean_i w_i mean((v_i - (eps_i / 2 - x0_i))^2)``."""

    name = "toy_weighted"
    calls = {"draw": 0, "couple": 0, "loss": 0}

    def draw(self, draws, generator):
        type(self).calls["draw"] += 1
        return {"w": torch.rand(draws.size, generator=draws.stream(FIRST_OBJECTIVE_STREAM + 7))}

    def couple(self, step, x0, eps, fresh, extras):
        type(self).calls["couple"] += 1
        return x0, eps / 2

    def loss(self, velocity, x0, eps, t, y, extras):
        type(self).calls["loss"] += 1
        v = velocity(interpolate(x0, eps, t), t, y)
        return (extras["w"] * ((v - (eps - x0)) ** 2).flatten(1).mean(1)).mean()


@pytest.fixture
def toy():
    register_objective(WeightedNoiseRegression)
    try:
        yield WeightedNoiseRegression
    finally:
        OBJECTIVES.pop(WeightedNoiseRegression.name, None)


def test_a_registered_objective_is_trained_without_touching_the_trainer(tmp_path, toy):
    cfg = load_config(RunConfig, None, TINY + [f"out_dir={tmp_path}", "name=toy", "train.steps=2",
                                               "flow.objective=toy_weighted"])
    tr = Trainer(cfg, progress=False)
    try:
        assert isinstance(tr.objective, toy)
        b = tr.draw_step(0)
        w = b["extras"]["w"]
        assert w.shape == (8,) and ((0 <= w) & (w < 1)).all()
        # The closed form of the step's loss, from the same draws and the same weights.
        with torch.no_grad():
            v = tr.velocity(interpolate(b["x0"], b["eps"], b["t"]), b["t"], b["y"])
            want = (w * ((v - (b["eps"] - b["x0"])) ** 2).flatten(1).mean(1)).mean()
        plain = Trainer(load_config(RunConfig, None, TINY + [f"out_dir={tmp_path}", "name=plain", "train.steps=1"]),
                        progress=False)
        try:  # couple halved the noise of the same draw; the draw itself is the trainer's
            assert torch.equal(b["eps"], plain.draw(0)[2] / 2) and torch.equal(b["t"], plain.draw(0)[3])
        finally:
            plain.close()
        tr.model.train()
        got = tr.train_step()["loss"]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        assert toy.calls["loss"] >= 1 and toy.calls["couple"] >= 2 and toy.calls["draw"] >= 2
    finally:
        tr.close()


def test_unknown_objective_is_refused_in_one_line_naming_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^flow\.objective: unknown training objective 'nope'; valid: auto, "
                                          r"flow_matching, rfpp, distillation, slimflow, repa, sra$"):
        load_config(RunConfig, None, ["flow.objective=nope"])
    capsys.readouterr()
    assert main(["train", "--no-progress", "--no-outputs", *TINY, f"out_dir={tmp_path}", "flow.objective=nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flow.objective" in err[0] and "'nope'" in err[0]
    assert not (tmp_path / "digits").exists()


def test_selection_rules():
    def chosen(*overrides):
        return select_objective(load_config(RunConfig, None, ["data.pairs=p", *overrides]))

    assert chosen() is FlowMatching and chosen("flow.loss=huber") is FlowMatching
    assert chosen("flow.loss=rfpp") is RectifiedFlowPP
    assert chosen("distill.steps=2") is Distillation
    assert chosen("distill.steps=1", "distill.teacher=t") is SlimFlow
    assert chosen("distill.anneal_steps=5") is SlimFlow and chosen("distill.flip=true") is SlimFlow
    assert chosen("flow.objective=distillation", "distill.steps=1") is Distillation
    # SlimFlow wraps what the rules give without it.
    cfg = load_config(RunConfig, None, ["data.pairs=p", "distill.flip=true", "distill.steps=2"])
    assert select_objective(cfg, exclude=(SlimFlow,)) is Distillation
    # A named objective that the other settings contradict is refused, naming the key.
    with pytest.raises(ConfigError, match="flow.objective=rfpp, but the other settings choose distillation"):
        chosen("flow.objective=rfpp", "distill.steps=1")


def test_registering_checks_the_name_and_the_sections():
    class NoName(TrainingObjective):
        pass

    class Clash(TrainingObjective):
        name = "rfpp"

    class NewSection(TrainingObjective):
        name = "new_section"
        sections = {"extra": dict}

    for cls, msg in ((NoName, "empty"), (Clash, "already registered"), (NewSection, "not part of the run config")):
        with pytest.raises(ValueError, match=msg):
            register_objective(cls)
    assert set(OBJECTIVES) == {"flow_matching", "rfpp", "distillation", "slimflow", "repa", "sra"}
