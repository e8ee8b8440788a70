"""Named model configurations, built by one function.

Paper sizes from DiT (Peebles & Xie 2023, table 1): S, B, L, XL with patch 2, 4 or 8
(``DiT-XL/2`` etc.), plus small configurations sized for the embedded digits (8x8) and
MNIST (28x28) and a tiny one for tests. The architecture comes from the name; the input
shape and the number of classes come from the data and are passed in.

Text-conditioned MMDiTs (SD3, FLUX-style; ``flowdit.models.mmdit``) are registered in
``mmdit_configs.MMDIT_CONFIGS`` and built by the same ``build_model``; their entries carry
their own input size and channels (an argument replaces them) and take no class count.
Decoupled Diffusion Transformers (``flowdit.models.ddt``, docs/ddt.md) are registered in
``DDT_CONFIGS``: a condition encoder of ``encoder_depth`` blocks and a velocity decoder of
``decoder_depth`` blocks, class-conditional like the DiTs (input shape and class count passed in).

``MODEL_CONFIGS`` lists the DiTs, ``DDT_CONFIGS`` the DDTs, ``MMDIT_CONFIGS`` the MMDiTs,
``model_names()`` all of them.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Optional, Union

from ..errors import ConfigError
from .ddt import DDT, DDTConfig
from .dico import DiCo, DiCoConfig
from .dit import DiT, DiTConfig
from .mmdit import MMDiT, MMDiTConfig
from .mmdit_configs import MMDIT_CONFIGS

_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

MODEL_CONFIGS: dict[str, dict] = {}
for _size, _arch in _SIZES.items():
    for _p in (2, 4, 8):
        MODEL_CONFIGS[f"DiT-{_size}/{_p}"] = dict(_arch, patch_size=_p)

MODEL_CONFIGS.update(
    {
        # 8x8 digits, patch 2: 16 tokens.
        "DiT-digits": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),
        # 28x28 MNIST, patch 4: 49 tokens (about 200 training images/s on 2 CPU cores, fp32).
        "DiT-mnist": dict(depth=6, hidden_size=128, num_heads=4, patch_size=4),
        # 28x28 MNIST, patch 4, a smaller student for SlimFlow-style distillation of DiT-mnist.
        "DiT-mnist-S": dict(depth=4, hidden_size=96, num_heads=4, patch_size=4),
        # 28x28 MNIST, patch 2: 196 tokens (about 4.5x the compute per image).
        "DiT-mnist/2": dict(depth=6, hidden_size=128, num_heads=4, patch_size=2),
        # For tests: a few thousand parameters.
        "DiT-tiny": dict(depth=2, hidden_size=32, num_heads=2, patch_size=2),
    }
)

DDT_CONFIGS: dict[str, dict] = {
    # The reference's released model (MCG-NJU/DDT, configs/repa_improved_ddt_xlen22de6_256.yaml): 22 + 6 blocks.
    "DDT-XL/2": dict(encoder_depth=22, decoder_depth=6, hidden_size=1152, num_heads=16, patch_size=2),
    # 28x28 MNIST, patch 4, DiT-mnist's width and heads: 4 encoder + 2 decoder blocks.
    "DDT-mnist": dict(encoder_depth=4, decoder_depth=2, hidden_size=128, num_heads=4, patch_size=4),
    # 28x28 MNIST, patch 4: 3 encoder + 3 decoder blocks.
    "DDT-mnist-3d3": dict(encoder_depth=3, decoder_depth=3, hidden_size=128, num_heads=4, patch_size=4),
    # 8x8 digits, patch 2, DiT-digits' width and depth: 3 encoder + 1 decoder block.
    "DDT-digits": dict(encoder_depth=3, decoder_depth=1, hidden_size=128, num_heads=4, patch_size=2),
    # For tests: 2 encoder + 1 decoder block of width 32.
    "DDT-tiny": dict(encoder_depth=2, decoder_depth=1, hidden_size=32, num_heads=2, patch_size=2),
}


DICO_CONFIGS: dict[str, dict] = {
    # The reference's sizes (shallowdream204/DiCo, dico_models.py DiCo_S ... DiCo_H).
    "DiCo-S": dict(hidden_size=128, depth=(5, 4, 4, 4, 4), mlp_ratio=2.0),
    "DiCo-B": dict(hidden_size=256, depth=(5, 4, 4, 4, 4), mlp_ratio=2.0),
    "DiCo-L": dict(hidden_size=352, depth=(9, 8, 9, 8, 9), mlp_ratio=2.0),
    "DiCo-XL": dict(hidden_size=416, depth=(9, 9, 10, 9, 9), mlp_ratio=2.0),
    "DiCo-H": dict(hidden_size=416, depth=(14, 12, 10, 12, 14), mlp_ratio=4.0),
    # 28x28 MNIST at DiT-mnist's parameter count (1.98M vs 1.87M; 3.2x its FLOPs per image).
    "DiCo-mnist": dict(hidden_size=40, depth=(2, 2, 2, 2, 2), mlp_ratio=2.0),
    # 28x28 MNIST at DiT-mnist's FLOPs per image (115M vs 117M; 0.82M parameters).
    "DiCo-mnist-F": dict(hidden_size=24, depth=(1, 2, 3, 2, 1), mlp_ratio=2.0),
    # For tests.
    "DiCo-tiny": dict(hidden_size=8, depth=(1, 1, 1, 1, 1), mlp_ratio=2.0),
}


def model_names() -> list[str]:
    """Every registered name: the DiTs, the DDTs, the DiCos, then the MMDiTs."""
    return [*MODEL_CONFIGS, *DDT_CONFIGS, *DICO_CONFIGS, *MMDIT_CONFIGS]


def _check_overrides(cls, overrides: dict) -> None:
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ConfigError(f"unknown model option(s) {bad}; valid: {sorted(valid)}")


def model_config(name: str, input_size: Optional[int] = None, in_channels: Optional[int] = None,
                 num_classes: Optional[int] = None, **overrides) -> Union[DiTConfig, DDTConfig, MMDiTConfig]:
    """The config of a registry entry for a given input shape (and, for a DiT, class count).

    ``overrides`` replace architecture fields (e.g. ``depth=4``, ``qk_norm=True``; a DDT has
    ``encoder_depth`` and ``decoder_depth`` instead of ``depth``). A DiT or DDT
    needs ``input_size``, ``in_channels`` and ``num_classes``; an MMDiT keeps its entry's
    ``input_size`` / ``in_channels`` where they are ``None`` and ignores ``num_classes``.
    """
    if name in MMDIT_CONFIGS:
        _check_overrides(MMDiTConfig, overrides)
        arch = dict(MMDIT_CONFIGS[name])
        arch.update({k: v for k, v in (("input_size", input_size), ("in_channels", in_channels)) if v is not None})
        cfg = replace(MMDiTConfig(**arch), **{k: v for k, v in overrides.items() if v is not None})
        cfg.validate()
        return cfg
    families = ((MODEL_CONFIGS, DiTConfig), (DDT_CONFIGS, DDTConfig), (DICO_CONFIGS, DiCoConfig))
    found = [(cls, table[name]) for table, cls in families if name in table]
    if not found:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    cls, arch = found[0]
    _check_overrides(cls, overrides)
    missing = [k for k, v in (("input_size", input_size), ("in_channels", in_channels),
                              ("num_classes", num_classes)) if v is None]
    if missing:
        raise ConfigError(f"model {name!r} needs {', '.join(missing)}")
    cfg = cls(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **arch)
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()
    return cfg


def build_model(name: str, input_size: Optional[int] = None, in_channels: Optional[int] = None,
                num_classes: Optional[int] = None, **overrides) -> Union[DiT, DDT, MMDiT]:
    """Build a registry model, e.g. ``build_model("DiT-S/2", 32, 4, 1000)``,
    ``build_model("DDT-mnist", 28, 1, 10)`` or ``build_model("SD3-medium")`` (on the meta
    device: ``with torch.device("meta"): ...``)."""
    cfg = model_config(name, input_size, in_channels, num_classes, **overrides)
    if isinstance(cfg, MMDiTConfig):
        return MMDiT(cfg)
    if isinstance(cfg, DiCoConfig):
        return DiCo(cfg)
    return DDT(cfg) if isinstance(cfg, DDTConfig) else DiT(cfg)
