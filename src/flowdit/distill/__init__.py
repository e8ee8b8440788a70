"""Straightening flows toward one step: coupling data, reflow, straightness metrics."""

from .pairs import Pairs, load_pairs, model_sampler, write_pairs
from .reflow import reflow_loss
from .straightness import FlowStraightness, straightness, transport_cost

__all__ = ["Pairs", "load_pairs", "model_sampler", "write_pairs", "reflow_loss", "FlowStraightness",
           "straightness", "transport_cost"]
