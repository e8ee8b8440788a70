"""The maximal-update parametrisation (muP) of a DiT: initialisation, readout, per-group
AdamW learning rates, and the coordinate check that tests them.

muP (Yang et al., "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
Hyperparameter Transfer", 2022; for DiTs: Zheng et al., "Scaling Diffusion Transformers
Efficiently via muP", 2025, code ``ML-GSAI/Scaling-Diffusion-Transformers-muP``) chooses how
the initialisation, the multipliers and the per-layer learning rates depend on the width
``n`` so that every activation, and its change after a training step, stays of order one as
``n`` grows. Hyperparameters tuned on a narrow proxy (the base width ``n_0``) then stay
optimal at any width: muP is a tuning method, not a speed method.

What it changes here, each as the reference does it (``DiT/models_mup.py``,
``DiT/train_mup.py`` with ``mup.MuAdamW``):

* **Parameter kinds** (``mup.set_base_shapes``): a dimension is *infinite* when it grows
  with the width. :func:`mup_parameter_kinds` finds them by building the same config at
  twice the width (twice the heads, same head size) on the meta device and comparing shapes.
  Two infinite dimensions: a *hidden* (matrix-like) weight (``qkv``, ``proj``, ``fc1``,
  ``fc2``, every ``adaLN_modulation`` linear, ``t_embedder.mlp.2``). One: an *input*
  weight (patch embedding, ``t_embedder.mlp.0``, the label table), a bias, or the
  *readout* (``final_layer.linear.weight``, infinite fan-in only). None: fixed (QK-norm gains).
* **Learning rates** (``mup.MuAdamW``): AdamW's learning rate of the hidden weights is
  ``lr / m`` with ``m = n / n_0`` (= ``lr * base_width / width``), their decoupled weight
  decay ``wd * m`` (so that the decay per step ``lr * wd`` does not change with width); every
  other parameter keeps ``lr`` and ``wd``. :func:`mup_param_groups`.
* **Readout** (``mup.MuReadout``): zero-initialised, and its input multiplied by
  ``output_mult / m`` (``DiTConfig.mup_output_mult``, the reference's ``2 ** logstd``;
  :class:`flowdit.models.dit.FinalLayer`'s ``input_mult``).
* **Initialisation** (``reset_parameters`` in the reference): every linear and the patch
  convolution ``N(0, 1 / fan_in)`` (``kaiming_normal_(a=1, mode="fan_in")``), biases zero, the
  label table ``N(0, 1)`` (``nn.Embedding``'s default), the readout zero. The adaLN modulations
  are initialised like the other hidden weights, not to zero: the reference gives up
  adaLN-Zero for muP. :func:`mup_initialize`.
* **Attention**: unchanged, ``softmax(q k^T / sqrt(d_head))``: the width grows by adding
  heads at a fixed head size (the reference's base shapes are 4 and 5 heads of 72), so the
  ``1/d`` rule of muP for a growing head size does not arise and the reference keeps timm's
  ``1/sqrt(d_head)``.

A muP model is a ``DiTConfig`` with ``mup_base_width`` set (:func:`mup_config`); the trainer
builds its AdamW from :func:`mup_param_groups` when the run's ``model.mup_base_width`` is set.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import torch
from torch import nn

from ..core.path import interpolate, velocity_target

if TYPE_CHECKING:
    from .dit import DiT, DiTConfig

__all__ = ["mup_config", "width_mult", "mup_initialize", "mup_parameter_kinds", "mup_param_groups",
           "coord_check", "coord_slopes", "COORD_LAYERS"]


def mup_config(config: "DiTConfig", base_width: int, output_mult: float = 1.0) -> "DiTConfig":
    """``config`` as a muP DiT with base width ``base_width`` (the proxy's ``hidden_size``,
    at which muP's learning rates equal the standard ones) and readout multiplier
    ``output_mult``; validated. Grow the width by ``num_heads`` at a fixed head size."""
    cfg = replace(config, mup_base_width=int(base_width), mup_output_mult=float(output_mult))
    cfg.validate()
    return cfg


def width_mult(config: "DiTConfig") -> float:
    """``m = hidden_size / mup_base_width``, the factor every infinite dimension of the model
    has grown by since the base model (``InfShape.width_mult`` of the mup package)."""
    if config.mup_base_width is None:
        raise ValueError("not a muP config: mup_base_width is None")
    return config.hidden_size / config.mup_base_width


@torch.no_grad()
def mup_initialize(model: "DiT") -> None:
    """The muP initialisation of the reference (``DiT/models_mup.py``), in place.

    Every ``nn.Linear`` and the patch ``nn.Conv2d``: weights ``N(0, 1 / fan_in)``
    (``kaiming_normal_(a=1, mode="fan_in")``; the variance of hidden weights falls as ``1/n``,
    that of input weights, whose fan-in is fixed, does not), biases zero; adaLN modulations
    included (no adaLN-Zero). The label table ``N(0, 1)``. The readout
    ``final_layer.linear`` zero (weight and bias), so the model's output starts at zero.
    The fixed sin-cos positions and the QK-norm gains (ones) are left as they are.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, a=1, mode="fan_in")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=1.0)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)


def _infinite_dims(model: "DiT") -> dict[str, tuple[int, ...]]:
    """For every parameter, the indices of the dimensions that grow with the width: those
    that differ in the same config built at twice the width (twice the heads) on the meta
    device (``mup.make_base_shapes`` from a base and a delta model)."""
    from .dit import DiT

    cfg = model.config
    wider = replace(cfg, hidden_size=2 * cfg.hidden_size, num_heads=2 * cfg.num_heads)
    with torch.device("meta"):
        twin = DiT(wider)
    shapes = {name: tuple(p.shape) for name, p in twin.named_parameters()}
    out = {}
    for name, p in model.named_parameters():
        if name not in shapes or len(shapes[name]) != p.ndim:
            raise ValueError(f"parameter {name} has no counterpart in the wider model; cannot tell its width")
        out[name] = tuple(i for i, (a, b) in enumerate(zip(p.shape, shapes[name])) if a != b)
    return out


def mup_parameter_kinds(model: "DiT") -> dict[str, str]:
    """Each parameter's muP kind, by name: ``"hidden"`` (two infinite dimensions,
    matrix-like: learning rate ``lr / m``), ``"readout"`` (infinite fan-in, finite fan-out:
    ``final_layer.linear.weight``, made muP by its ``1/m`` input multiplier), ``"input"``
    (a weight whose only infinite dimension is its fan-out, or a bias), ``"fixed"`` (no
    infinite dimension). Only ``"hidden"`` changes its learning rate (``mup.MuAdamW``).

    Raises ``ValueError`` for a parameter with more than two infinite dimensions, or a
    readout-like weight other than the muP readout, which muP would need a multiplier for.
    """
    kinds = {}
    # An embedding table [num_embeddings, D] is an input weight: its width is its fan-out.
    tables = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, nn.Embedding)}
    for name, dims in _infinite_dims(model).items():
        if len(dims) > 2:
            raise ValueError(f"parameter {name} has {len(dims)} infinite dimensions; muP handles at most 2")
        if len(dims) == 2:
            kinds[name] = "hidden"
        elif len(dims) == 1 and dims[0] == 1 and name.endswith("weight") and name not in tables:
            if name != "final_layer.linear.weight":
                raise ValueError(f"parameter {name} maps a width dimension to a fixed one: only the readout "
                                 "final_layer.linear may (it carries the 1/m multiplier)")
            kinds[name] = "readout"
        elif len(dims) == 1:
            kinds[name] = "input"
        else:
            kinds[name] = "fixed"
    return kinds


def mup_param_groups(model: "DiT", lr: float, weight_decay: float = 0.0) -> list[dict]:
    """AdamW parameter groups of muP (``mup.MuAdamW``) for a muP DiT.

    Returns two groups, each a dict with ``params``, ``lr``, ``weight_decay``, ``lr_scale``
    (the group's learning rate over the base one, which the trainer multiplies into its
    schedule) and ``mup`` (the kind):

    * ``"hidden"``: the matrix-like weights, ``lr_scale = 1 / m = base_width / width``,
      weight decay ``weight_decay * m``;
    * ``"vector"``: every other parameter (input weights, biases, readout, fixed), ``lr``
      and ``weight_decay`` as given.

    ``m = hidden_size / mup_base_width`` (:func:`width_mult`). Parameters keep the order of
    ``model.parameters()`` within each group.
    """
    m = width_mult(model.config)
    kinds = mup_parameter_kinds(model)
    hidden = [p for n, p in model.named_parameters() if kinds[n] == "hidden"]
    vector = [p for n, p in model.named_parameters() if kinds[n] != "hidden"]
    return [
        {"params": hidden, "lr": lr / m, "lr_scale": 1.0 / m, "weight_decay": weight_decay * m, "mup": "hidden"},
        {"params": vector, "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay, "mup": "vector"},
    ]


# -- the coordinate check -------------------------------------------------------------

# Layer types whose outputs the coordinate check records (mean |x| over their output tensor,
# averaged over the blocks): module name pattern -> type.
COORD_LAYERS = {
    "x_embedder": "patch_embed",
    "t_embedder": "t_embed",
    "y_embedder": "y_embed",
    "blocks.*.adaLN_modulation.1": "adaLN",
    "blocks.*.attn.qkv": "qkv",
    "blocks.*.attn": "attn_out",
    "blocks.*.mlp.fc1": "fc1",
    "blocks.*.mlp": "mlp_out",
    "blocks.*": "block",
    "final_layer": "output",
}


def _coord_type(name: str) -> Optional[str]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit():
        name = ".".join(["blocks", "*", *parts[2:]])
    return COORD_LAYERS.get(name)


def _coord_model(width: int, head_dim: int, depth: int, input_size: int, in_channels: int, num_classes: int,
                 patch_size: int, mlp_ratio: float, base_width: Optional[int]) -> "DiT":
    from .dit import DiT, DiTConfig

    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of the head size {head_dim}")
    cfg = DiTConfig(input_size=input_size, in_channels=in_channels, patch_size=patch_size, hidden_size=width,
                    depth=depth, num_heads=width // head_dim, mlp_ratio=mlp_ratio, num_classes=num_classes,
                    mup_base_width=base_width)
    return DiT(cfg)


def coord_check(x0: torch.Tensor, y: torch.Tensor, num_classes: int, widths: Sequence[int] = (32, 64, 128, 256),
                head_dim: int = 32, depth: int = 2, steps: int = 4, lr: float = 1e-2, mup: bool = True,
                base_width: Optional[int] = None, seeds: Iterable[int] = (0,), patch_size: int = 2,
                mlp_ratio: float = 4.0) -> dict:
    """The coordinate check of muP (Tensor Programs V, sec. 4 / ``mup.coord_check``; the
    reference's ``DiT/coordcheck.py``): train DiTs of several widths for a few AdamW steps
    on one fixed batch and record the mean absolute value of each layer type's output.

    Under muP (``mup=True``: :func:`mup_config` with ``base_width``, default the smallest
    width, and :func:`mup_param_groups`) each curve is flat in the width at every step;
    under the standard parametrisation (flowdit's DiT init, one AdamW learning rate) the
    outputs of the updated layers grow with the width after the first step.

    Args:
        x0: the fixed batch of data ``[B, C, H, W]`` (in ``[-1, 1]``); y: its labels ``[B]``.
        num_classes: the label count (``y`` may hold the null class ``num_classes``).
        widths: hidden sizes, each ``num_heads * head_dim`` (width grows by heads).
        depth, patch_size, mlp_ratio: the rest of the architecture.
        steps: AdamW updates (no weight decay, no clipping); activations
            are recorded on the forward before each update and once after the last.
        lr: the (base) learning rate.
        seeds: the model initialisation and the batch's noise and times are drawn from each
            seed (the same noise and times at every width); results are averaged over seeds.

    Returns:
        ``{"widths": [...], "steps": steps, "mup": bool, "lr": lr, "l1": {type: [[mean |x| at
        t = 0..steps] per width]}}``; ``t`` counts the updates made before the forward; the
        types are the values of :data:`COORD_LAYERS`. The rectified-flow loss is the MSE to
        the velocity ``eps - x0`` at ``x_t = (1 - t) x0 + t eps``.
    """
    widths = list(widths)
    seeds = list(seeds)
    base = (base_width or min(widths)) if mup else None
    C, H = x0.shape[1], x0.shape[2]
    sums: dict[str, list[list[float]]] = {}
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.rand(x0.shape[0], generator=g)
        xt, target = interpolate(x0, eps, t), velocity_target(x0, eps)
        for wi, width in enumerate(widths):
            torch.manual_seed(seed)
            model = _coord_model(width, head_dim, depth, H, C, num_classes, patch_size, mlp_ratio, base).train()
            params = mup_param_groups(model, lr) if mup else model.parameters()
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            record: dict[str, list[float]] = {}
            hooks = []
            for name, module in model.named_modules():
                kind = _coord_type(name)
                if kind is not None:
                    hooks.append(module.register_forward_hook(
                        lambda mod, inp, out, kind=kind: record.setdefault(kind, []).append(
                            float(out.detach().abs().mean()))))
            try:
                for step in range(steps + 1):
                    record.clear()
                    loss = (model(xt, t, y) - target).pow(2).mean()
                    for kind, vals in record.items():
                        per_width = sums.setdefault(kind, [[0.0] * (steps + 1) for _ in widths])
                        per_width[wi][step] += sum(vals) / len(vals) / len(seeds)
                    if step < steps:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
            finally:
                for h in hooks:
                    h.remove()
    return {"widths": widths, "steps": steps, "mup": mup, "lr": lr, "base_width": base, "l1": sums}


def coord_slopes(result: dict, step: int = -1) -> dict[str, float]:
    """The least-squares slope of ``log(mean |x|)`` against ``log(width)`` for each layer
    type of a :func:`coord_check` result at update count ``step`` (default the last):
    about 0 where the activations do not grow with the width (muP), 1 where they grow
    linearly (the output of a standard-parametrised readout after Adam steps)."""
    xs = [math.log(w) for w in result["widths"]]
    mx = sum(xs) / len(xs)
    out = {}
    for kind, per_width in result["l1"].items():
        ys = [math.log(max(v[step], 1e-30)) for v in per_width]
        my = sum(ys) / len(ys)
        out[kind] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    return out
