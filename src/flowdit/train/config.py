"""Typed configuration of a training run, loadable from YAML with ``key=value`` overrides.

A recipe file (``configs/digits.yaml``) names only what differs from these defaults;
``flowdit train --config FILE train.steps=500 optim.lr=3e-4`` overrides single keys, and
the resolved configuration is written to ``<run_dir>/config.yaml``.

Every key carries a one-line help (``flowdit train --list-keys`` prints them with their
types and defaults). The whole tree is validated when it is built, before any data is read
or any step is run: each section checks its own keys, :meth:`RunConfig.validate` the
combinations and the names that registries resolve (model, solver, time sampler, data set).
Messages use the keys as the user writes them (``train.keep_ckpts``).

The sections of the training objectives live with them (:mod:`flowdit.train.objectives`):
``flow`` (:class:`FlowSection`, shared by every objective and the trainer's draws) and
``distill`` (:class:`DistillSection`), re-exported here. :class:`RunConfig` is the core
sections plus one field per section the registered objectives bring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from ..errors import ConfigError
from .objectives import DistillSection, FlowSection, check_objectives, objective_sections
from .sections import absolute_path, key, non_negative, positive

# The largest seed every consumer accepts (torch.manual_seed takes up to 2**64 - 1, NumPy's
# SeedSequence any non-negative int; a signed 64-bit bound keeps both happy).
MAX_SEED = 2**63 - 1


# The section helpers, under the names this module has always used.
_key, _positive, _non_negative = key, positive, non_negative


def check_seed(value: int, name: str) -> int:
    """Refuse a seed outside ``0 .. 2**63 - 1``, naming the key or flag ``name``."""
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{name} must be in 0..2**63-1, got {value}")
    return value


def solver_names() -> tuple[str, ...]:
    """Every solver name ``generate`` accepts: the fixed-step registry, then the adaptive ones."""
    from ..sampling.sample import ADAPTIVE_METHODS
    from ..sampling.solvers import SOLVERS

    return tuple(SOLVERS) + tuple(ADAPTIVE_METHODS)


def check_solver(name: str, key: str) -> str:
    """Refuse a solver name that the sampling registries do not know, naming ``key``."""
    names = solver_names()
    if name.strip().lower().replace("-", "_") not in names:
        raise ConfigError(f"{key}: unknown solver {name!r}; valid: {', '.join(names)}")
    return name


@dataclass
class ModelSection:
    """Which registry model to build; ``None`` fields keep the registry's value."""

    name: str = _key("DiT-digits", "registry model (DiT-S/2 ... DiT-XL/8, DiT-digits, DiT-mnist, DiT-mnist-S, "
                                   "DiT-mnist/2, DiT-tiny; DDT-mnist, DDT-mnist-3d3, DDT-digits, DDT-XL/2, DDT-tiny)")
    depth: Optional[int] = _key(None, "number of transformer blocks (null: the registry's)")
    hidden_size: Optional[int] = _key(None, "token width (null: the registry's)")
    num_heads: Optional[int] = _key(None, "attention heads (null: the registry's)")
    patch_size: Optional[int] = _key(None, "patch side in pixels (null: the registry's)")
    mlp_ratio: Optional[float] = _key(None, "MLP width / token width (null: the registry's)")
    qk_norm: Optional[bool] = _key(None, "RMS-normalise queries and keys (null: the registry's; off for the DiTs)")
    mup_base_width: Optional[int] = _key(None, "muP with this base width (hidden size of the tuned proxy; grow the "
                                               "width by num_heads): muP init and readout, AdamW lr x base/width "
                                               "on hidden matrices (null: standard parametrisation; DiTs only)")
    mup_output_mult: Optional[float] = _key(None, "muP readout multiplier (null: 1; needs model.mup_base_width)")

    def overrides(self) -> dict:
        keys = ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "qk_norm", "mup_base_width",
                "mup_output_mult")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def validate(self) -> None:
        from ..models.registry import MODEL_CONFIGS

        from ..models.registry import model_names

        if self.name not in model_names():
            raise ConfigError(f"model.name: unknown model {self.name!r}; known models: {', '.join(model_names())}")
        _positive("model", self, "depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio", "mup_base_width",
                  "mup_output_mult")
        from ..models.mmdit_configs import MMDIT_CONFIGS

        if self.name in MMDIT_CONFIGS and (self.mup_base_width is not None or self.mup_output_mult is not None):
            raise ConfigError(f"model.mup_base_width / mup_output_mult apply to the class-conditional DiTs, "
                              f"not {self.name}")


@dataclass
class DataSection:
    """``dataset``: ``digits`` (embedded), ``mnist`` (IDX files in ``root``), ``folder`` or
    ``shapes`` (rendered captioned scenes, :mod:`flowdit.data.shapes`).

    ``pairs``: a directory written by ``flowdit reflow pairs``; when set, the run trains on
    those fixed ``(noise, sample, label)`` couplings (reflow) instead of data with fresh
    noise. ``dataset`` still names the data set the samples imitate (shape, classes, metrics).

    Relative paths (``root``, ``pairs``) are relative to the directory flowdit is run from;
    the run's ``config.yaml`` records them made absolute, so that resuming, sampling or
    scoring the run from anywhere reads the same files.
    """

    dataset: str = _key("digits", "digits (embedded), mnist (IDX files in data.root), folder (one subfolder "
                                  "per class) or shapes (rendered scenes)")
    root: Optional[str] = _key(None, "directory of the data set's files (mnist, folder); relative to the "
                                     "working directory")
    image_size: Optional[int] = _key(None, "folder: resize target; shapes: rendered side (default 64); "
                                           "digits / mnist: may only restate 8 / 28")
    channels: Optional[int] = _key(None, "folder: 1 or 3 (default 3); digits / mnist: may only be 1")
    pairs: Optional[str] = _key(None, "directory of coupling pairs (flowdit reflow pairs): train on them (reflow)")
    num_items: Optional[int] = _key(None, "shapes: number of rendered training scenes (null: 8000)")
    latents: Optional[str] = _key(None, "directory of a latent cache (flowdit autoencoder encode): train on its "
                                        "latents (and captions); dataset names the images they encode")

    def validate(self) -> None:
        from ..data import DATASET_NAMES

        if self.dataset not in DATASET_NAMES:
            raise ConfigError(f"data.dataset: unknown data set {self.dataset!r}; valid: {', '.join(DATASET_NAMES)}")
        _positive("data", self, "image_size", "num_items")
        if self.num_items is not None and self.dataset != "shapes":
            raise ConfigError(f"data.num_items applies to rendered data sets (shapes), not {self.dataset}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {self.channels}")

    def shape(self) -> tuple[int, int]:
        """``(channels, size)`` the data set will have, known without reading it (for a
        latent cache, from its ``index.json``)."""
        if self.latents is not None:
            return _latent_shape(self.latents)
        if self.dataset == "digits":
            return 1, 8
        if self.dataset == "mnist":
            return 1, 28
        if self.dataset == "shapes":
            return 3, (self.image_size or 64)
        return (self.channels or 3), (self.image_size or 0)


def _latent_shape(path: str) -> tuple[int, int]:
    import json
    from pathlib import Path

    index = Path(path).expanduser() / "index.json"
    try:
        shape = json.loads(index.read_text())["shape"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"data.latents: {index} is missing or unreadable (write the cache with flowdit "
                          "autoencoder encode)") from None
    return int(shape[0]), int(shape[1])


@dataclass
class TextSection:
    """Text conditioning (:mod:`flowdit.train.conditioning`): ``encoder`` set trains a
    text-conditioned model (an MMDiT) on the data's captions, one paraphrase drawn per item
    and step; ``flow.label_dropout`` is then the probability of the empty prompt."""

    encoder: Optional[str] = _key(None, "minilm, hash or a local transformers folder (null: class labels)")
    max_length: int = _key(32, "text tokens per prompt")
    cache_dir: str = _key("text_cache", "where caption encodings are cached; relative to the working directory")

    def validate(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"text.max_length must be >= 2, got {self.max_length}")


@dataclass
class OptimSection:
    """AdamW with linear warm-up, gradient clipping and an EMA of the weights."""

    lr: float = _key(1e-3, "peak learning rate of AdamW")
    betas: tuple[float, float] = _key((0.9, 0.999), "AdamW betas, each in [0, 1)")
    weight_decay: float = _key(0.0, "AdamW decoupled weight decay (>= 0)")
    warmup_steps: int = _key(100, "linear learning-rate warm-up steps (0: none)")
    grad_clip: float = _key(1.0, "clip the global gradient norm to this value (0: no clipping)")
    ema_decay: float = _key(0.999, "decay of the EMA of the weights, in [0, 1)")
    ema_warmup: bool = _key(True, "EMA decay min(decay, (1 + k) / (10 + k)) at step k")

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"optim.betas[{i}] must be in [0, 1), got {b}")
        _non_negative("optim", self, "weight_decay", "warmup_steps", "grad_clip")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TrainSection:
    """Length, batch and bookkeeping of the run. ``batch_size`` is the global batch: the
    sum over processes and gradient-accumulation micro-steps. ``init_from``: a run or
    checkpoint directory whose EMA weights start the model and its EMA (reflow starts from
    its teacher); ignored when resuming. ``grad_checkpoint``: recompute each block in
    the backward pass instead of storing its activations (less memory, about a third more
    compute). ``tf32``: allow TensorFloat-32 matmuls on CUDA (no effect on a CPU).
    ``max_nonfinite_steps``: how many steps with a non-finite loss or gradient norm are
    skipped (no update of the weights, the EMA or the optimizer state) before the run stops;
    0 stops at the first."""

    steps: int = _key(2000, "optimizer steps of the run (may be raised on --resume)")
    batch_size: int = _key(128, "global batch: all processes and gradient-accumulation micro-steps")
    grad_accum: int = _key(1, "gradient-accumulation micro-steps per optimizer step")
    precision: Literal["auto", "bf16", "fp32"] = _key("auto", "auto: bf16 autocast where the hardware runs it "
                                                              "natively, else fp32")
    compile: bool = _key(False, "torch.compile the model (falls back to eager with a message)")
    grad_checkpoint: bool = _key(False, "recompute each block in backward (less memory, more compute)")
    tf32: bool = _key(True, "allow TensorFloat-32 matmuls on CUDA")
    seed: int = _key(0, "seed of the weights, the data order and every draw, in 0..2**63-1")
    log_every: int = _key(50, "append a line to metrics.jsonl every this many steps")
    ckpt_every: int = _key(500, "write a checkpoint every this many steps (0: only at the end)")
    keep_ckpts: int = _key(2, "keep this many newest checkpoints (>= 1)")
    sample_every: int = _key(0, "write an EMA sample grid every this many steps (0: never)")
    tensorboard: bool = _key(False, "also log to TensorBoard (needs the tensorboard package)")
    init_from: Optional[str] = _key(None, "run or checkpoint directory whose EMA weights start the model")
    max_nonfinite_steps: int = _key(0, "skip up to this many steps with a non-finite loss or gradient norm "
                                       "(0: stop at the first)")

    def validate(self) -> None:
        _positive("train", self, "steps", "batch_size", "grad_accum", "log_every", "keep_ckpts")
        _non_negative("train", self, "ckpt_every", "sample_every", "max_nonfinite_steps")
        check_seed(self.seed, "train.seed")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size {self.batch_size} is not divisible by train.grad_accum {self.grad_accum}"
            )


@dataclass
class SampleSection:
    """How the run samples: periodic EMA grids during training and the final outputs."""

    solver: str = _key("heun", "solver of the sample grids and final samples (flowdit sample --help lists them)")
    steps: int = _key(16, "solver steps (ignored by adaptive solvers)")
    cfg: float = _key(1.5, "classifier-free guidance scale (1: none; >= 0)")
    per_class: int = _key(10, "samples per class in samples.png")
    num_eval: int = _key(1000, "samples in samples.npz, scored in metrics.json")

    def validate(self) -> None:
        check_solver(self.solver, "sample.solver")
        _positive("sample", self, "steps", "per_class", "num_eval")
        if self.cfg < 0:
            raise ConfigError(f"sample.cfg must be >= 0 (1: no guidance), got {self.cfg}")


@dataclass
class CoreConfig:
    """The sections of a training run every objective shares; :class:`RunConfig` adds the
    sections the training objectives bring (:func:`flowdit.train.objectives.objective_sections`)."""

    name: str = _key("digits", "run name: the run directory is out_dir/name")
    out_dir: str = _key("runs", "directory holding the runs; relative to the working directory")
    model: ModelSection = _key(factory=ModelSection)
    data: DataSection = _key(factory=DataSection)
    text: TextSection = _key(factory=TextSection)
    flow: FlowSection = _key(factory=FlowSection)
    optim: OptimSection = _key(factory=OptimSection)
    train: TrainSection = _key(factory=TrainSection)
    sample: SampleSection = _key(factory=SampleSection)

    def validate(self) -> None:
        """Checks across sections: the objectives' own (what needs coupling pairs, which
        losses combine, :func:`flowdit.train.objectives.check_objectives`) and whether the
        model fits the data set's shape."""
        if not self.name or self.name in (".", "..") or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"name must be a plain directory name (no '/'), got {self.name!r}")
        if not self.out_dir:
            raise ConfigError("out_dir must not be empty")
        check_objectives(self)
        from ..models.mmdit_configs import MMDIT_CONFIGS

        text_model = self.model.name in MMDIT_CONFIGS
        if text_model and not self.text.encoder:
            raise ConfigError(f"model.name {self.model.name} is text-conditioned: set text.encoder (minilm, hash "
                              "or a local transformers folder)")
        if self.text.encoder and not text_model:
            raise ConfigError(f"text.encoder is set but model.name {self.model.name} is class-conditional; choose "
                              f"a text-conditioned model ({', '.join(MMDIT_CONFIGS)})")
        if self.text.encoder and self.data.pairs:
            raise ConfigError("data.pairs (reflow couplings) carry class labels; text conditioning does not take them")
        channels, size = self.data.shape()
        if size:  # a folder without data.image_size is refused when the data set is built
            from ..models.registry import model_config

            try:  # the class count does not change which architectures are valid
                model_config(self.model.name, size, channels, 10, **self.model.overrides())
            except ConfigError as e:
                raise ConfigError(f"model: {e} (for {size}x{size} {self.data.dataset} images)") from None

    def resolved(self):
        """A copy whose input paths (``data.root``, ``data.pairs``, ``train.init_from``, and
        those of the objectives' sections, e.g. ``distill.teacher``: each section with a
        ``resolved()`` method) are absolute, resolved against the working directory; what a
        run records in its ``config.yaml``."""
        sections = {name: getattr(self, name).resolved() for name in objective_sections()
                    if callable(getattr(getattr(self, name), "resolved", None))}
        return dataclasses.replace(
            self,
            data=dataclasses.replace(self.data, root=absolute_path(self.data.root),
                                     pairs=absolute_path(self.data.pairs), latents=absolute_path(self.data.latents)),
            text=dataclasses.replace(self.text, cache_dir=absolute_path(self.text.cache_dir)),
            train=dataclasses.replace(self.train, init_from=absolute_path(self.train.init_from)),
            **sections,
        )


def _run_config_class() -> type:
    """:class:`CoreConfig` plus one field per objective section, after the core ones."""
    fields = [(name, section, _key(factory=section)) for name, section in objective_sections().items()]
    cls = dataclasses.make_dataclass("RunConfig", fields, bases=(CoreConfig,), namespace={
        "__doc__": """A complete training run. Outputs go to ``<out_dir>/<name>/``. The core sections
    (:class:`CoreConfig`), then the training objectives' (``distill``: :class:`DistillSection`)."""})
    cls.__module__ = __name__
    return cls


if TYPE_CHECKING:
    class RunConfig(CoreConfig):
        """A complete training run (see :func:`_run_config_class`)."""

        distill: DistillSection
else:
    RunConfig = _run_config_class()


# Keys whose change on --resume leaves the weights' trajectory as it was: how long the run
# goes, what it logs and samples, and how often it saves. Everything else needs
# --allow-config-change, which records the change next to the run.
RESUME_FREE_KEYS = (
    "train.steps", "train.log_every", "train.ckpt_every", "train.sample_every", "train.tensorboard",
    "sample.solver", "sample.steps", "sample.cfg", "sample.per_class", "sample.num_eval",
)

