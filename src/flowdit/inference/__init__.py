"""Inference: load a trained run, turn a model into a guided velocity, generate in batches.

Layering: imports ``sampling``, ``models``, ``core``, ``utils`` and
``flowdit.checkpoint_io`` only; the methods (``accel``, ``edit``, ``distill``), training,
the benchmarks and the command line build on it.
"""

from flowdit.inference.generate import Generated, balanced_labels, generate, indexed_noise
from flowdit.inference.loading import load_run_model
from flowdit.inference.velocity import ModelVelocity, model_velocity

__all__ = ["Generated", "ModelVelocity", "balanced_labels", "generate", "indexed_noise", "load_run_model",
           "model_velocity"]
