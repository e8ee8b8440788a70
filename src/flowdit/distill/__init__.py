"""Straightening flows toward one step: coupling data, reflow, 2-rectified flow++,
k-step and one-step distillation, SlimFlow, straightness metrics."""

from ..sampling.solvers import Renoise
from .onestep import DISTILL_LOSSES, distill_times, distillation_loss
from .pairs import Pairs, load_pairs, model_sampler, write_pairs
from .perceptual import FeatureDistance, LPIPSDistance, PerceptualFn
from .reflow import reflow_loss
from .rfpp import rfpp_huber_c, rfpp_loss
from .slimflow import anneal_randomness, flow_guided_target, guide_times, joint_flip, mix_noise
from .straightness import FlowStraightness, straightness, transport_cost

__all__ = ["Pairs", "load_pairs", "model_sampler", "write_pairs", "reflow_loss", "FlowStraightness",
           "straightness", "transport_cost", "rfpp_loss", "rfpp_huber_c", "Renoise", "FeatureDistance",
           "LPIPSDistance", "PerceptualFn", "DISTILL_LOSSES", "distill_times", "distillation_loss",
           "anneal_randomness", "mix_noise", "joint_flip", "guide_times", "flow_guided_target"]
