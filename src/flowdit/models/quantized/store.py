"""Saving and rebuilding quantized layers: packed codes on disk, modules in memory.

A quantized model is stored as the float model's state dict without the quantized
layers' ``weight`` / ``bias``, plus, per quantized layer ``<name>``, tensors named
``<name>.<field>`` and a JSON spec (``layers[name]``: kind, codec, bits, shape). Codes
are bit-packed (:mod:`.packing`), so a 4-bit weight takes half a byte per entry on disk.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

from .linear import FakeQuantLinear, Int8Linear
from .packing import pack_bits, unpack_bits
from .quantizers import TwinLogWeight, UniformWeight
from .rotation import outlier_rotation_matrix, random_hadamard

__all__ = ["apply_quantized", "decode_layer", "encode_fake", "encode_int8", "quantized_layer_names"]


def _twin_log_codes(w: TwinLogWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``b``-bit codes of a twin-log weight plus the entries that do not fit (the reference's
    extra negative level and exact zeros), as flat indices and their values."""
    n = 2 ** (w.bits - 1)
    q = w.q.to(torch.int32)
    codes = torch.where(w.sign > 0, q, n + q)
    extra = (w.sign == 0) | ((w.sign < 0) & (q >= n))
    idx = extra.reshape(-1).nonzero().reshape(-1)
    values = w.dequantize().reshape(-1)[idx]
    codes = torch.where(extra, torch.zeros_like(codes), codes)
    return codes, idx.to(torch.int32), values.float()


def encode_fake(codes: UniformWeight | TwinLogWeight, bias: Optional[torch.Tensor], act_bits: Optional[int],
                smooth: Optional[torch.Tensor] = None, rotation: Optional[Mapping[str, torch.Tensor]] = None
                ) -> tuple[dict, dict]:
    """``(spec, tensors)`` of a :class:`FakeQuantLinear` whose weight has ``codes``.

    ``rotation`` holds the factors the rotation is rebuilt from: ``{"signs": [in]}`` for a
    randomised Hadamard, ``{"rot1": [k, k], "perm": [in], "rot2": [k, k]}`` for the
    outlier-aware rotation; ``None`` for none."""
    out_f, in_f = codes.q.shape
    spec: dict[str, Any] = {"kind": "fake", "bits": codes.bits, "act_bits": act_bits, "shape": [out_f, in_f]}
    t: dict[str, torch.Tensor] = {}
    if isinstance(codes, UniformWeight):
        spec["codec"] = "uniform"
        t["q"] = pack_bits(codes.q, codes.bits)
        t["scale"], t["zero"] = codes.scale, codes.zero
    else:
        spec["codec"] = "twin_log"
        spec["eta"] = codes.eta
        c, idx, values = _twin_log_codes(codes)
        t["q"] = pack_bits(c, codes.bits)
        t["delta_pos"], t["zero_pos"] = codes.delta_pos, codes.zero_pos
        t["delta_neg"], t["zero_neg"] = codes.delta_neg, codes.zero_neg
        t["extra_index"], t["extra_value"] = idx, values
    if bias is not None:
        t["bias"] = bias.detach().float()
    if smooth is not None:
        t["smooth"] = smooth.float()
    if rotation is not None:
        if set(rotation) not in ({"signs"}, {"rot1", "perm", "rot2"}):
            raise ValueError(f"rotation factors must be signs, or rot1, perm and rot2; got {sorted(rotation)}")
        for k, v in rotation.items():
            t[k] = v.to(torch.int8) if k == "signs" else v.to(torch.int32) if k == "perm" else v.float()
    return spec, t


def _rotation(t: Mapping[str, torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if "signs" in t:
        return random_hadamard(n, t["signs"])
    if "rot1" in t:
        return outlier_rotation_matrix(t["rot1"], t["perm"], t["rot2"])
    return None


def encode_int8(layer: Int8Linear) -> tuple[dict, dict]:
    """``(spec, tensors)`` of an :class:`Int8Linear` (int8 weights are stored as they are)."""
    spec = {"kind": "int8", "bits": 8, "act_bits": 8, "act": layer.act, "shape": [layer.out_features, layer.in_features]}
    t = {"qweight": layer.qweight, "wscale": layer.wscale}
    if layer.bias is not None:
        t["bias"] = layer.bias
    if layer.smooth is not None:
        t["smooth"] = layer.smooth
    return spec, t


def _dequantize_fake(spec: Mapping[str, Any], t: Mapping[str, torch.Tensor]) -> torch.Tensor:
    shape = tuple(spec["shape"])
    bits = int(spec["bits"])
    c = unpack_bits(t["q"], bits, shape)
    if spec["codec"] == "uniform":
        return UniformWeight(c, t["scale"], t["zero"], bits).dequantize()
    n = 2 ** (bits - 1)
    c32 = c.to(torch.int32)
    sign = torch.where(c32 < n, 1, -1).to(torch.int8)
    q = torch.where(c32 < n, c32, c32 - n).to(torch.uint8)
    w = TwinLogWeight(q, sign, t["delta_pos"], t["zero_pos"], t["delta_neg"], t["zero_neg"],
                      float(spec["eta"]), bits).dequantize().reshape(-1)
    w[t["extra_index"].long()] = t["extra_value"]
    return w.view(shape)


def decode_layer(spec: Mapping[str, Any], t: Mapping[str, torch.Tensor], backend: str = "auto") -> nn.Module:
    """Rebuild the module a spec and its tensors describe."""
    if spec["kind"] == "int8":
        return Int8Linear(t["qweight"], t["wscale"], t.get("bias"), t.get("smooth"), backend=backend,
                          act=spec.get("act", "token"))
    if spec["kind"] == "fake":
        return FakeQuantLinear(_dequantize_fake(spec, t), t.get("bias"), spec.get("act_bits"),
                               t.get("smooth"), _rotation(t, int(spec["shape"][1])))
    raise ValueError(f"unknown quantized layer kind {spec['kind']!r}")


def quantized_layer_names(spec: Mapping[str, Any]) -> list[str]:
    return list(spec.get("layers", {}))


def apply_quantized(model: nn.Module, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                    backend: str = "auto") -> nn.Module:
    """Load a stored quantized model into a freshly built float ``model`` (in place).

    Every layer named in ``spec["layers"]`` is replaced by its quantized module; every other
    tensor loads strictly (a missing or unexpected key raises ``KeyError`` naming it).
    """
    layers = spec.get("layers", {})
    rest = dict(tensors)
    for name, lspec in layers.items():
        prefix = name + "."
        own = {k[len(prefix):]: rest.pop(k) for k in [k for k in rest if k.startswith(prefix)]}
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if not isinstance(getattr(parent, child, None), nn.Linear):
            raise KeyError(f"quantized layer {name!r} is not a linear layer of this model")
        setattr(parent, child, decode_layer(lspec, own, backend))
    expected = set(model.state_dict()) - {k for k in model.state_dict() if any(k.startswith(n + ".") for n in layers)}
    missing, unexpected = sorted(expected - set(rest)), sorted(set(rest) - expected)
    if missing or unexpected:
        raise KeyError(f"quantized checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(rest, strict=False)
    return model
