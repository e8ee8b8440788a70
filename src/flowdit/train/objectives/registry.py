"""The registry of training objectives: names to classes, the config sections they bring,
and the rule that chooses one for a run.

Selection (:func:`select_objective`). ``flow.objective`` names a registered objective, or is
``auto`` (the default): then the *last* objective in :data:`OBJECTIVES` whose
``selected_by(cfg)`` holds is chosen, which for the built-in ones gives, by priority:

1. ``slimflow`` when ``distill.teacher``, ``distill.anneal_steps`` or ``distill.flip`` is set,
   around the objective these rules give without it;
2. ``distillation`` when ``distill.steps > 0``;
3. ``rfpp`` when ``flow.loss=rfpp``;
4. ``flow_matching`` otherwise (``flow.loss`` ``mse`` / ``huber``; reflow on ``data.pairs``).

``repa`` and ``sra`` (representation alignment around flow matching) are chosen only by
name, ``flow.objective=repa`` / ``sra``.

A named objective is refused when the settings choose another one than the fallback
``flow_matching`` (``flow.objective=rfpp`` with ``distill.steps=1``, say), so that no key is
silently ignored.

Adding an objective: one module in this package with a :class:`TrainingObjective` subclass,
and one line in :data:`OBJECTIVES` (docs/extending.md). Its ``sections`` become fields of
:class:`flowdit.train.config.RunConfig`, after the core sections. :func:`register_objective`
adds one at run time (a plugin, a test); it cannot add config sections, since the run
config is assembled when :mod:`flowdit.train.config` is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from ...errors import ConfigError
from .base import TrainingObjective
from .distillation import Distillation
from .flow_matching import FlowMatching
from .repa import REPA
from .rfpp import RectifiedFlowPP
from .slimflow import SlimFlow
from .sra import SRA

if TYPE_CHECKING:
    from ..config import RunConfig

__all__ = ["OBJECTIVES", "objective_sections", "objective_names", "register_objective", "select_objective",
           "build_objective", "check_objectives"]

# Name -> class. Order matters for flow.objective=auto: the last one selected wins.
OBJECTIVES: dict[str, type[TrainingObjective]] = {
    "flow_matching": FlowMatching,
    "rfpp": RectifiedFlowPP,
    "distillation": Distillation,
    "slimflow": SlimFlow,
    "repa": REPA,
    "sra": SRA,
}


def objective_names() -> tuple[str, ...]:
    """The registered objective names, in registry order."""
    return tuple(OBJECTIVES)


def objective_sections() -> dict[str, type]:
    """The config sections the registered objectives bring, ``{key: dataclass}``, in registry
    order; refuses two different classes under one key."""
    out: dict[str, type] = {}
    for cls in OBJECTIVES.values():
        for name, section in cls.sections.items():
            if out.setdefault(name, section) is not section:
                raise TypeError(f"config section {name!r}: {cls.__name__} brings {section.__name__}, another "
                                f"objective {out[name].__name__}")
    return out


def register_objective(cls: type[TrainingObjective], replace: bool = False) -> type[TrainingObjective]:
    """Add ``cls`` to :data:`OBJECTIVES` under ``cls.name`` (usable as a class decorator);
    ``replace`` allows taking over a registered name. Its ``sections`` must already be
    part of the run config."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}.name is empty")
    if cls.name == "auto":
        raise ValueError("'auto' is not an objective name: flow.objective=auto applies the selection rules")
    if cls.name in OBJECTIVES and not replace and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"training objective {cls.name!r} is already registered")
    known = objective_sections()
    for name, section in cls.sections.items():
        if known.get(name) is not section:
            raise ValueError(f"{cls.__name__}: config section {name!r} is not part of the run config; list the "
                             "objective in flowdit/train/objectives/registry.py instead")
    OBJECTIVES[cls.name] = cls
    return cls


def _auto(cfg: "RunConfig", exclude: tuple[type, ...] = ()) -> type[TrainingObjective]:
    for cls in reversed(list(OBJECTIVES.values())):
        if cls not in exclude and cls.selected_by(cfg):
            return cls
    return FlowMatching


def select_objective(cfg: "RunConfig", exclude: tuple[type, ...] = ()) -> type[TrainingObjective]:
    """The objective class ``cfg`` trains with (the rules in the module docstring), leaving
    out the classes in ``exclude`` (a wrapping objective asks for its inner one so)."""
    name = cfg.flow.objective
    auto = _auto(cfg, exclude)
    if name == "auto" or OBJECTIVES.get(name) in exclude:
        return auto
    if name not in OBJECTIVES:
        raise ConfigError(f"flow.objective: unknown training objective {name!r}; valid: auto, "
                          f"{', '.join(objective_names())}")
    cls = OBJECTIVES[name]
    if auto is not cls and auto is not FlowMatching:
        raise ConfigError(f"flow.objective={name}, but the other settings choose {auto.name}; "
                          "set flow.objective=auto or drop those settings")
    return cls


def check_objectives(cfg: "RunConfig") -> None:
    """Run every registered objective's ``check_config`` (highest priority first) and the
    selection rules on ``cfg``; a :class:`ConfigError` names the keys."""
    for cls in reversed(list(OBJECTIVES.values())):
        cls.check_config(cfg)
    select_objective(cfg)


def build_objective(cfg: "RunConfig", dataset, device: torch.device,
                    amp_dtype: Optional[torch.dtype]) -> TrainingObjective:
    """The objective of ``cfg``, built for ``dataset`` on ``device`` (its frozen helper
    networks loaded); what :class:`flowdit.train.trainer.Trainer` trains with."""
    return select_objective(cfg)(cfg, dataset, device, amp_dtype)
