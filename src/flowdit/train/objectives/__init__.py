"""Training objectives: each one a class with its config section, its extra random draws,
its frozen helper networks and its loss (the protocol: :mod:`.base`; the names and the
selection rules: :mod:`.registry`).

=================  ==============================  ==========================================
name               class                           selected (``flow.objective=auto``) by
=================  ==============================  ==========================================
``flow_matching``  :class:`FlowMatching`           fallback: ``flow.loss`` ``mse`` / ``huber``
``rfpp``           :class:`RectifiedFlowPP`        ``flow.loss=rfpp``
``distillation``   :class:`Distillation`           ``distill.steps > 0``
``slimflow``       :class:`SlimFlow`               ``distill.teacher`` / ``anneal_steps`` / ``flip``
``repa``           :class:`REPA`                   name only (``flow.objective=repa``)
``sra``            :class:`SRA`                    name only (``flow.objective=sra``)
=================  ==============================  ==========================================
"""

from .base import FIRST_OBJECTIVE_STREAM, Extras, StepDraws, TrainingObjective, Velocity, build_perceptual
from .distillation import Distillation, DistillSection
from .flow_matching import FlowMatching, FlowSection
from .registry import (
    OBJECTIVES,
    build_objective,
    check_objectives,
    objective_names,
    objective_sections,
    register_objective,
    select_objective,
)
from .repa import REPA, RepaSection
from .rfpp import RectifiedFlowPP
from .slimflow import SlimFlow
from .sra import SRA, SraSection

__all__ = ["TrainingObjective", "StepDraws", "Extras", "Velocity", "FIRST_OBJECTIVE_STREAM", "build_perceptual",
           "FlowMatching", "FlowSection", "RectifiedFlowPP", "Distillation", "DistillSection", "SlimFlow",
           "REPA", "RepaSection", "SRA", "SraSection",
           "OBJECTIVES", "objective_names", "objective_sections", "register_objective", "select_objective",
           "build_objective", "check_objectives"]
