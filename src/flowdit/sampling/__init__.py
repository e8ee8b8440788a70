"""Sampling: solvers, time grids, guidance, and the loop that ties them together."""

from flowdit.sampling.guidance import (
    GuidanceCounter,
    GuidedVelocity,
    cfg_combine,
    cfg_velocity,
    classifier_free_guidance,
)
from flowdit.sampling.sample import ADAPTIVE_METHODS, CountingModelFn, SampleResult, sample
from flowdit.sampling.schedules import SCHEDULES, build_schedule, shifted, uniform
from flowdit.sampling.solvers import (
    SOLVERS,
    Euler,
    FireFlow,
    Heun,
    Midpoint,
    Renoise,
    RFSolver,
    Solver,
    build_solver,
    call_velocity,
)

__all__ = [
    "sample",
    "SampleResult",
    "CountingModelFn",
    "ADAPTIVE_METHODS",
    "Solver",
    "Euler",
    "Heun",
    "Midpoint",
    "RFSolver",
    "FireFlow",
    "Renoise",
    "SOLVERS",
    "build_solver",
    "call_velocity",
    "uniform",
    "shifted",
    "SCHEDULES",
    "build_schedule",
    "cfg_velocity",
    "classifier_free_guidance",
    "cfg_combine",
    "GuidedVelocity",
    "GuidanceCounter",
]
