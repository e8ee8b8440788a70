"""Core math shared by every method: the rectified path, time samplers and losses."""

from flowdit.core.losses import default_huber_c, flow_matching_loss
from flowdit.core.path import (
    eps_from_velocity,
    eps_from_x0,
    expand_t,
    interpolate,
    velocity_from_eps,
    velocity_from_x0,
    velocity_target,
    x0_from_eps,
    x0_from_velocity,
)
from flowdit.core.timesteps import (
    TIME_SAMPLERS,
    CosMap,
    LogitNormal,
    ModeSampling,
    TimeSampler,
    Uniform,
    UShaped,
    build_time_sampler,
    dynamic_shift,
    resolution_shift,
    shift_time,
)

__all__ = [
    "resolution_shift",
    "dynamic_shift",
    "expand_t",
    "interpolate",
    "velocity_target",
    "x0_from_velocity",
    "eps_from_velocity",
    "velocity_from_x0",
    "velocity_from_eps",
    "x0_from_eps",
    "eps_from_x0",
    "shift_time",
    "TimeSampler",
    "Uniform",
    "LogitNormal",
    "ModeSampling",
    "CosMap",
    "UShaped",
    "TIME_SAMPLERS",
    "build_time_sampler",
    "flow_matching_loss",
    "default_huber_c",
]
