"""Typed configs: YAML + overrides -> nested dataclasses, with clear errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from flowdit.errors import ConfigError
from flowdit.utils.config import (
    apply_overrides,
    config_diff,
    describe_keys,
    from_dict,
    load_config,
    parse_override,
    save_config,
    to_dict,
)

VALIDATED: list[str] = []


@dataclass
class ModelCfg:
    name: str = "DiT-S/2"
    depth: int = 4
    patch: int = 2
    qk_norm: bool = False
    channels: tuple[int, ...] = (32, 64)

    def validate(self):
        VALIDATED.append("model")
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")


@dataclass
class OptimCfg:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclass
class TrainCfg:
    steps: int = 100
    batch_size: int = 8
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_clip: Optional[float] = None
    optim: OptimCfg = field(default_factory=OptimCfg)
    milestones: list[int] = field(default_factory=list)


@dataclass
class RootCfg:
    model: ModelCfg = field(default_factory=ModelCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    seed: int = 0
    out_dir: str = "runs/x"

    def validate(self):
        VALIDATED.append("root")


@dataclass
class Required:
    name: str
    size: int = 1


YAML = """
model:
  depth: 6
  qk_norm: true
  channels: [16, 32, 64]
train:
  steps: 200
  precision: bf16
  optim:
    lr: 3.0e-4
    betas: [0.8, 0.95]
  milestones: [10, 20]
seed: 7
"""


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_nested_from_yaml(tmp_path):
    cfg = load_config(RootCfg, write(tmp_path, YAML), [])
    assert cfg.model == ModelCfg(depth=6, qk_norm=True, channels=(16, 32, 64))
    assert cfg.train.steps == 200 and cfg.train.precision == "bf16"
    assert cfg.train.optim.lr == pytest.approx(3e-4)
    assert cfg.train.optim.betas == (0.8, 0.95)
    assert isinstance(cfg.train.optim.betas, tuple)
    assert cfg.train.milestones == [10, 20]
    assert cfg.seed == 7 and cfg.out_dir == "runs/x"


def test_overrides_nested_keys(tmp_path):
    cfg = load_config(
        RootCfg,
        write(tmp_path, YAML),
        ["train.optim.weight_decay=0.05", "model.depth=3", "train.grad_clip=1", "seed=11"],
    )
    assert cfg.train.optim.weight_decay == 0.05
    assert cfg.train.optim.lr == pytest.approx(3e-4)  # untouched sibling survives
    assert cfg.model.depth == 3 and cfg.model.qk_norm is True
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)
    assert cfg.seed == 11


def test_overrides_without_file_create_intermediate_dicts():
    cfg = load_config(RootCfg, None, ["train.optim.lr=0.5", "train.milestones=[1, 2]"])
    assert cfg.train.optim.lr == 0.5 and cfg.train.milestones == [1, 2]
    assert apply_overrides({"a": 1}, ["b.c.d=2"]) == {"a": 1, "b": {"c": {"d": 2}}}


def test_override_below_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'seed' is 0, not a mapping"):
        apply_overrides({"seed": 0}, ["seed.x=1"])


def test_float_coercion_of_yaml_string():
    key, value = parse_override("train.optim.lr=1e-4")
    assert key == "train.optim.lr" and value == "1e-4"  # YAML 1.1 leaves this a string
    cfg = load_config(RootCfg, None, ["train.optim.lr=1e-4"])
    assert cfg.train.optim.lr == 1e-4 and isinstance(cfg.train.optim.lr, float)
    assert from_dict(OptimCfg, {"lr": 2}).lr == 2.0


def test_int_accepts_whole_scientific_notation():
    assert load_config(RootCfg, None, ["train.steps=1e5"]).train.steps == 100000
    with pytest.raises(ConfigError, match="train.steps: expected int, got 1.5"):
        load_config(RootCfg, None, ["train.steps=1.5"])


@pytest.mark.parametrize("raw,expected", [("true", True), ("false", False), ("yes", True), ("off", False)])
def test_bool_parsing(raw, expected):
    assert load_config(RootCfg, None, [f"model.qk_norm={raw}"]).model.qk_norm is expected


def test_bool_rejects_other_values():
    with pytest.raises(ConfigError, match="model.qk_norm: expected bool, got 'maybe'"):
        load_config(RootCfg, None, ["model.qk_norm=maybe"])


def test_parse_override_values():
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a.b=[1,2]") == ("a.b", [1, 2])
    assert parse_override("a= 3 ") == ("a", 3)
    assert parse_override("name=x=y") == ("name", "x=y")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="bad key"):
        parse_override("train..lr=1")


def test_literal_validation():
    with pytest.raises(ConfigError, match=r"train.precision: expected one of 'fp32', 'bf16', got 'fp16'"):
        load_config(RootCfg, None, ["train.precision=fp16"])


def test_unknown_key_names_dotted_key_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(RootCfg, write(tmp_path, "train:\n  optim:\n    lrr: 0.1\n"), [])
    msg = str(e.value)
    assert "train.optim.lrr" in msg
    assert "did you mean 'train.optim.lr'" in msg
    assert "lr, betas, weight_decay" in msg
    assert "\n" not in msg


def test_bad_type_message():
    with pytest.raises(ConfigError) as e:
        load_config(RootCfg, None, ["train.optim.lr=abc"])
    assert str(e.value) == "train.optim.lr: expected float, got 'abc'"
    with pytest.raises(ConfigError, match=r"train.milestones\[1\]: expected int, got 'x'"):
        from_dict(RootCfg, {"train": {"milestones": [1, "x"]}})
    with pytest.raises(ConfigError, match="train.optim.betas: expected 2 items"):
        from_dict(RootCfg, {"train": {"optim": {"betas": [0.9]}}})
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        from_dict(RootCfg, {"train": 3})


def test_required_key_missing():
    with pytest.raises(ConfigError, match="name: required key is missing"):
        from_dict(Required, {"size": 2})
    assert from_dict(Required, {"name": "a"}) == Required("a", 1)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(RootCfg, tmp_path / "nope.yaml", [])


def test_yaml_syntax_error_and_non_mapping(tmp_path):
    bad = write(tmp_path, "model: [1, 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(RootCfg, bad, [])
    lst = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="list.yaml: top level must be a mapping, got list"):
        load_config(RootCfg, lst, [])
    assert load_config(RootCfg, write(tmp_path, "", "empty.yaml"), []) == RootCfg()


def test_validate_called_children_first():
    VALIDATED.clear()
    load_config(RootCfg, None, [])
    assert VALIDATED == ["model", "root"]
    with pytest.raises(ConfigError) as e:
        load_config(RootCfg, None, ["model.depth=0"])
    assert str(e.value) == "model: depth must be >= 1, got 0"


def test_round_trip(tmp_path):
    cfg = load_config(RootCfg, write(tmp_path, YAML), ["train.grad_clip=0.5", "train.optim.lr=1e-4"])
    d = to_dict(cfg)
    assert d["model"]["channels"] == [16, 32, 64]  # tuples become lists
    out = save_config(cfg, tmp_path / "sub" / "resolved.yaml")
    assert out.exists()
    assert not [p for p in out.parent.iterdir() if p.name != "resolved.yaml"]  # no temp left
    again = load_config(RootCfg, out, [])
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", ".nan", "1e999"])
def test_float_keys_refuse_non_finite_values(raw):
    with pytest.raises(ConfigError) as e:
        load_config(RootCfg, None, [f"train.optim.lr={raw}"])
    assert str(e.value).startswith("train.optim.lr: expected a finite number, got ")


def test_base_config_is_completed_by_file_keys_then_overrides(tmp_path):
    base = to_dict(load_config(RootCfg, None, ["seed=5", "train.steps=7", "model.depth=2"]))
    cfg = load_config(RootCfg, write(tmp_path, "train:\n  steps: 9\n"), ["model.depth=3"], base=base)
    assert (cfg.seed, cfg.train.steps, cfg.model.depth) == (5, 9, 3)
    assert config_diff(base, to_dict(cfg)) == [("model.depth", 2, 3), ("train.steps", 7, 9)]
    assert config_diff({"a": 1}, {"a": 1, "b": {"c": 2}}) == [("b", None, {"c": 2})]


def test_describe_keys_lists_every_leaf_with_type_default_and_help():
    from flowdit.train.config import RunConfig

    rows = describe_keys(RootCfg)
    assert [r["key"] for r in rows][:3] == ["model.name", "model.depth", "model.patch"]
    assert {"key": "train.grad_clip", "type": "Optional[float]", "default": None, "help": ""} in rows
    assert {"key": "model.channels", "type": "tuple[int, ...]", "default": [32, 64], "help": ""} in rows
    run_rows = describe_keys(RunConfig)
    assert all(r["help"] for r in run_rows)  # every key of a training run says what it does
    assert len(run_rows) == len({r["key"] for r in run_rows})


def test_run_config_is_validated_as_a_whole_with_the_users_key_names():
    from flowdit.train.config import RunConfig

    cases = {
        "train.keep_ckpts=0": "train.keep_ckpts must be positive, got 0",
        "optim.betas=[0.9,1.0]": "optim.betas[1] must be in [0, 1), got 1.0",
        "optim.grad_clip=-1": "optim.grad_clip must be >= 0, got -1.0",
        "train.seed=-3": "train.seed must be in 0..2**63-1, got -3",
        "sample.solver=rk4": "sample.solver: unknown solver 'rk4'; valid: euler, heun,",
        "sample.cfg=-0.5": "sample.cfg must be >= 0 (1: no guidance), got -0.5",
        "data.channels=2": "data.channels must be 1 or 3, got 2",
        "name=a/b": "name must be a plain directory name (no '/'), got 'a/b'",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(RunConfig, None, [override])
        assert str(e.value).startswith(message), (override, str(e.value))
