"""Post-training quantization of a trained DiT: W8A8 in real int8, and LRQ-DiT.

One function, :func:`quantize_model`, turns a float model and its calibration statistics
into a quantized copy plus what to store (``spec``, ``tensors``: see
:mod:`flowdit.models.quantized.store`). What it does is set by :class:`QuantizeConfig`,
whose presets are the named methods:

- ``w8a8``: SmoothQuant migration (alpha 0.5) then per-channel int8 weights and per-token
  int8 activations, multiplied in int8 (:class:`~flowdit.models.quantized.Int8Linear`).
- ``rtn``: per-channel uniform weights (with the clipping search) and per-token
  activations, no smoothing, no rotation: the round-to-nearest baseline, as fake quant.
- ``smoothquant``: ``rtn`` after SmoothQuant's migration.
- ``lrq``: LRQ-DiT (Yang et al. 2025): SmoothQuant migration (alpha 0.5), the Adaptive
  Rotation Scheme, twin-log weights, per-token activations, as its public code does.

Any field can be changed on top of a preset (``codec``, ``rotation``, ``smooth_alpha``)
for the ablation rows (log vs uniform, with and without rotation).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..models.quantized import (encode_fake, encode_int8, Int8Linear, decode_layer, random_hadamard,
                                twin_log_quantize, uniform_quantize)
from ..models.quantized.rotation import is_power_of_two, outlier_rotation_matrix
from ..utils.seeding import seeded_generator
from .calibrate import DEFAULT_LAYERS, LayerStats, target_linears
from .lrq_dit import outlier_aware_rotation

__all__ = ["PRESETS", "QuantizeConfig", "quantize_model", "smooth_factors"]

CODECS = ("uniform", "twin_log", "twin_log_own")
ROTATIONS = ("none", "hadamard", "ars")


@dataclass(frozen=True)
class QuantizeConfig:
    """What :func:`quantize_model` does.

    kind: ``"int8"`` (real W8A8) or ``"fake"`` (exact fake quantization at any bits).
    codec: weight quantizer: ``uniform`` (per-channel, clipping search), ``twin_log``
        (LRQ-DiT's, as its code), ``twin_log_own`` (flowdit's variant: each sign's range
        from its own entries, :func:`~flowdit.models.quantized.twin_log_quantize`).
    wbits, abits: weight and activation bits (``abits=None``: weight-only).
    smooth_alpha: SmoothQuant migration strength, ``None`` for none.
    act: activation scales of ``kind int8``: ``token`` (per token, SmoothQuant's O1) or
        ``tensor`` (one per input, O2: oneDNN's fused epilogue, faster); fake quant is per token.
    rotation: ``none``, ``hadamard`` (a randomised Hadamard on every layer) or ``ars``
        (LRQ-DiT's Adaptive Rotation Scheme: Hadamard where the layer's fluctuation ``J`` is
        below ``ars_threshold``, the outlier-aware rotation above it).
    """

    kind: str = "fake"
    codec: str = "uniform"
    wbits: int = 8
    abits: Optional[int] = 8
    smooth_alpha: Optional[float] = None
    act: str = "token"
    rotation: str = "none"
    ars_threshold: float = 1.0
    seed: int = 0
    pattern: str = DEFAULT_LAYERS

    def validate(self) -> None:
        if self.kind not in ("int8", "fake"):
            raise ConfigError(f"kind: must be int8 or fake, got {self.kind!r}")
        if self.codec not in CODECS:
            raise ConfigError(f"codec: must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"rotation: must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")
        if not 2 <= self.wbits <= 8:
            raise ConfigError(f"wbits: must be in 2..8, got {self.wbits}")
        if self.abits is not None and not 2 <= self.abits <= 16:
            raise ConfigError(f"abits: must be in 2..16 or none, got {self.abits}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth_alpha: must be in [0, 1] or none, got {self.smooth_alpha}")
        if self.act not in ("token", "tensor"):
            raise ConfigError(f"act: must be token or tensor, got {self.act!r}")
        if self.act == "tensor" and self.kind != "int8":
            raise ConfigError("act tensor is a setting of kind int8 (fake quantization is per token)")
        if self.kind == "int8":
            if (self.wbits, self.abits, self.codec, self.rotation) != (8, 8, "uniform", "none"):
                raise ConfigError("kind int8 is W8A8 with uniform weights and no rotation; use kind fake for other settings")


PRESETS: dict[str, QuantizeConfig] = {
    "w8a8": QuantizeConfig(kind="int8", wbits=8, abits=8, smooth_alpha=0.5),
    "rtn": QuantizeConfig(kind="fake", codec="uniform", wbits=4, abits=8),
    "smoothquant": QuantizeConfig(kind="fake", codec="uniform", wbits=4, abits=8, smooth_alpha=0.5),
    "lrq": QuantizeConfig(kind="fake", codec="twin_log", wbits=4, abits=8, smooth_alpha=0.5, rotation="ars"),
}


def smooth_factors(weight: torch.Tensor, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor in the form LRQ-DiT's code applies it
    (``ViDiTQuantizedLinear.get_channel_mask``): ``m_j = max|W_:,j|^alpha / max|X_j|^(1 - alpha)``,
    the input multiplied by ``m`` and the weight's columns divided by it. At ``alpha = 0.5`` it
    is the reciprocal of SmoothQuant's ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` (the
    input divided by ``s``), the same migration.

    Args:
        weight: ``[out, in]``; act_absmax: ``[in]`` calibration max |x| per channel.
    """
    w_max = weight.abs().amax(0).clamp_min(1e-5)
    x_max = act_absmax.float().clamp_min(1e-5)
    return w_max**alpha / x_max ** (1 - alpha)


def _signs(n: int, seed: int, index: int) -> torch.Tensor:
    g = seeded_generator(seed, 0xAD, index)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8)


def quantize_model(model: nn.Module, cfg: QuantizeConfig, stats: dict[str, LayerStats]
                   ) -> tuple[nn.Module, dict, dict[str, torch.Tensor]]:
    """A quantized copy of ``model`` and what to store of it.

    Returns ``(quantized model, spec, tensors)``: ``spec`` records the config and, per layer,
    its quantized format, its fluctuation ``J`` and the rotation it got; ``tensors`` holds the
    float model's other weights and each quantized layer's packed fields. The returned model
    is rebuilt from ``spec`` and ``tensors`` (what runs is what is stored).
    """
    cfg.validate()
    qmodel = copy.deepcopy(model).eval()
    layers = target_linears(qmodel, cfg.pattern)
    missing = [n for n in layers if n not in stats]
    if missing:
        raise ConfigError(f"no calibration statistics for layer {missing[0]}")
    spec = {"config": asdict(cfg), "layers": {}}
    tensors = {k: v for k, v in qmodel.state_dict().items() if not any(k.startswith(n + ".") for n in layers)}
    for index, (name, lin) in enumerate(layers.items()):
        w = lin.weight.detach().float()
        bias = None if lin.bias is None else lin.bias.detach().float()
        st = stats[name]
        smooth = None if cfg.smooth_alpha is None else smooth_factors(w, st.absmax, cfg.smooth_alpha)
        rot = cfg.rotation
        if rot == "ars":
            rot = "hadamard" if st.fluctuation < cfg.ars_threshold else "outlier"
        if cfg.kind == "int8":
            layer_spec, layer_t = encode_int8(Int8Linear.from_linear(lin, smooth, act=cfg.act))
        else:
            wt = w if smooth is None else w / smooth[None, :]
            factors = None
            if rot == "hadamard":
                if not is_power_of_two(lin.in_features):
                    raise ConfigError(f"rotation: layer {name} has {lin.in_features} input channels; the Hadamard "
                                      "rotation needs a power of two")
                factors = {"signs": _signs(lin.in_features, cfg.seed, index)}
                wt = wt @ random_hadamard(lin.in_features, factors["signs"])
            elif rot == "outlier":
                rows = st.sample_rows() if smooth is None else st.sample_rows() * smooth[None, :]
                factors = outlier_aware_rotation(rows, seed=cfg.seed, index=index)
                wt = wt @ outlier_rotation_matrix(factors["rot1"], factors["perm"], factors["rot2"])
            if cfg.codec == "uniform":
                codes = uniform_quantize(wt, cfg.wbits)
            else:
                codes = twin_log_quantize(wt, cfg.wbits, own_sign_range=cfg.codec == "twin_log_own")
            layer_spec, layer_t = encode_fake(codes, bias, cfg.abits, smooth, factors)
            err = torch.mean((codes.dequantize() - wt) ** 2) / torch.mean(wt**2)
            layer_spec["weight_rel_mse"] = float(err)
        layer_spec["fluctuation"] = st.fluctuation
        layer_spec["rotation"] = rot
        spec["layers"][name] = layer_spec
        tensors.update({f"{name}.{k}": v for k, v in layer_t.items()})
        parent_name, _, child = name.rpartition(".")
        setattr(qmodel.get_submodule(parent_name), child, decode_layer(layer_spec, layer_t))
    return qmodel, spec, tensors


def preset(name: str, **overrides) -> QuantizeConfig:
    """A preset of :data:`PRESETS` with some fields replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"method: must be one of {', '.join(PRESETS)}, got {name!r}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
