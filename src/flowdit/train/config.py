"""Typed configuration of a training run, loadable from YAML with ``key=value`` overrides.

A recipe file (``configs/digits.yaml``) names only what differs from these defaults;
``flowdit train --config FILE train.steps=500 optim.lr=3e-4`` overrides single keys, and
the resolved configuration is written to ``<run_dir>/config.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..errors import ConfigError


@dataclass
class ModelSection:
    """Which registry model to build; ``None`` fields keep the registry's value."""

    name: str = "DiT-digits"
    depth: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    patch_size: Optional[int] = None
    mlp_ratio: Optional[float] = None
    qk_norm: bool = False

    def overrides(self) -> dict:
        keys = ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out["qk_norm"] = self.qk_norm
        return out


@dataclass
class DataSection:
    """``dataset``: ``digits`` (embedded), ``mnist`` (IDX files in ``root``) or ``folder``.

    ``pairs``: a directory written by ``flowdit reflow pairs``; when set, the run trains on
    those fixed ``(noise, sample, label)`` couplings (reflow) instead of data with fresh
    noise. ``dataset`` still names the data set the samples imitate (shape, classes, metrics).
    """

    dataset: str = "digits"
    root: Optional[str] = None
    image_size: Optional[int] = None
    channels: Optional[int] = None
    pairs: Optional[str] = None


@dataclass
class FlowSection:
    """The rectified-flow objective: how t is drawn, the loss, and label dropout for CFG.

    ``loss``: ``mse``, ``huber`` (pseudo-Huber, ``huber_c``) or ``rfpp``, the 2-rectified
    flow++ loss on pairs: ``(1 - t)`` pseudo-Huber plus ``perceptual_weight / t`` times the
    ``perceptual`` distance of the data estimate (:func:`flowdit.distill.rfpp_loss`).
    ``perceptual``: ``guide`` (LPIPS-style distance on the data set's shipped guide network)
    or ``lpips`` (the ``lpips`` package, where installed with its weights); also used by
    ``distill.loss=perceptual``.
    """

    time_sampler: str = "logit_normal:m=0,s=1"
    shift: float = 1.0
    loss: Literal["mse", "huber", "rfpp"] = "mse"
    huber_c: Optional[float] = None
    label_dropout: float = 0.1
    perceptual: Literal["guide", "lpips"] = "guide"
    perceptual_weight: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"flow.label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.shift <= 0:
            raise ConfigError(f"flow.shift must be positive, got {self.shift}")
        if self.huber_c is not None and not self.huber_c > 0:
            raise ConfigError(f"flow.huber_c must be positive, got {self.huber_c}")
        if self.perceptual_weight < 0:
            raise ConfigError(f"flow.perceptual_weight must be >= 0, got {self.perceptual_weight}")


@dataclass
class DistillSection:
    """Distillation on ``data.pairs`` (all off by default, which is plain reflow).

    ``steps``: ``k >= 1`` trains a k-step student: t only on the grid ``1, (k-1)/k, ..., 1/k``
    (1: one-step), ``loss`` the distance (``mse``, ``huber`` or ``perceptual``); 0: off.
    ``teacher``: a run directory; adds SlimFlow's flow-guided term (two-step target from
    that teacher on fresh noise, weight ``teacher_weight``); needs ``steps=1``.
    ``anneal_steps``: SlimFlow's annealing reflow, the pair noise blended with fresh noise,
    ``sqrt(1 - b^2) z + b eps``, ``b`` from 1 to 0 over that many steps by
    ``anneal_schedule`` (``linear``, ``cos``, ``exp``); 0: off. ``flip``: flip each pair's
    data and noise left-right together with probability 1/2.
    """

    steps: int = 0
    loss: Literal["mse", "huber", "perceptual"] = "mse"
    teacher: Optional[str] = None
    teacher_weight: float = 1.0
    anneal_steps: int = 0
    anneal_schedule: Literal["linear", "cos", "exp"] = "linear"
    flip: bool = False

    @property
    def active(self) -> bool:
        return bool(self.steps or self.teacher or self.anneal_steps or self.flip)

    def validate(self) -> None:
        if self.steps < 0 or self.anneal_steps < 0:
            raise ConfigError(f"distill.steps and distill.anneal_steps must be >= 0, got {self.steps}, "
                              f"{self.anneal_steps}")
        if self.teacher and self.steps != 1:
            raise ConfigError(f"distill.teacher (flow-guided distillation) is a one-step method: set distill.steps=1, "
                              f"got distill.steps={self.steps}")
        if self.teacher_weight < 0:
            raise ConfigError(f"distill.teacher_weight must be >= 0, got {self.teacher_weight}")


@dataclass
class OptimSection:
    """AdamW with linear warm-up, gradient clipping and an EMA of the weights."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainSection:
    """Length, batch and bookkeeping of the run. ``batch_size`` is the global batch: the
    sum over processes and gradient-accumulation micro-steps. ``init_from``: a run or
    checkpoint directory whose EMA weights start the model and its EMA (reflow starts from
    its teacher); ignored when resuming. ``grad_checkpoint``: recompute each block in
    the backward pass instead of storing its activations (less memory, about a third more
    compute). ``tf32``: allow TensorFloat-32 matmuls on CUDA (no effect on a CPU)."""

    steps: int = 2000
    batch_size: int = 128
    grad_accum: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    compile: bool = False
    grad_checkpoint: bool = False
    tf32: bool = True
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_ckpts: int = 2
    sample_every: int = 0
    tensorboard: bool = False
    init_from: Optional[str] = None

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size {self.batch_size} is not divisible by train.grad_accum {self.grad_accum}"
            )


@dataclass
class SampleSection:
    """How the run samples: periodic EMA grids during training and the final outputs."""

    solver: str = "heun"
    steps: int = 16
    cfg: float = 1.5
    per_class: int = 10
    num_eval: int = 1000


@dataclass
class RunConfig:
    """A complete training run. Outputs go to ``<out_dir>/<name>/``."""

    name: str = "digits"
    out_dir: str = "runs"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    flow: FlowSection = field(default_factory=FlowSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def validate(self) -> None:
        """Checks across sections: what needs coupling pairs, and which losses combine."""
        if self.distill.active and not self.data.pairs:
            raise ConfigError("distill.* options train on coupling pairs: set data.pairs (flowdit reflow pairs)")
        if self.flow.loss == "rfpp" and not self.data.pairs:
            raise ConfigError("flow.loss=rfpp is the 2-rectified flow++ reflow loss: set data.pairs")
        if self.flow.loss == "rfpp" and self.distill.steps:
            raise ConfigError("flow.loss=rfpp trains the flow at all t; for distillation (distill.steps > 0) choose "
                              "the distance with distill.loss")
