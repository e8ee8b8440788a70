"""Load a trained model back from a run directory or checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint_io import load_checkpoint, load_state_dict_strict, nonfinite_tensors
from ..errors import CheckpointError
from ..models import DDT, DDTConfig, DiT, DiTConfig
from ..models.dico import DiCo, DiCoConfig
from ..models.mmdit import MMDiT, MMDiTConfig
from ..models.adapters import apply_adapters
from ..models.quantized import apply_quantized

__all__ = ["load_run_model"]


def load_run_model(path: str | Path, use_ema: bool = True, map_location: str = "cpu") -> tuple[DiT, dict]:
    """The model saved in a run directory (its latest checkpoint) or a checkpoint directory.

    Returns ``(model in eval mode, meta)`` where ``meta`` holds the run's resolved config,
    model config and data description; the class is rebuilt from the manifest's ``model_class``
    (``DiT``, ``DDT``, ``DiCo`` or ``MMDiT``, recorded by the trainer); a text-conditioned run (MMDiT) also
    records its text encoder and, when trained on latents, the latent cache's autoencoder. ``use_ema`` picks the EMA weights (the ones to
    sample from) over the raw training weights.
    """
    ckpt = load_checkpoint(path, map_location=map_location, load_tensors_only=True)
    mc = ckpt.meta.get("model_config")
    if mc is None:
        raise CheckpointError(f"{ckpt.path}: manifest has no model_config; not a flowdit training checkpoint")
    if ckpt.meta.get("model_class") == "MMDiT":  # a text-conditioned run
        if isinstance(mc.get("axes_dims"), list):
            mc = dict(mc, axes_dims=tuple(mc["axes_dims"]))
        model = MMDiT(MMDiTConfig(**mc))
    elif ckpt.meta.get("model_class") == "DDT":  # a Decoupled Diffusion Transformer (flowdit.models.ddt)
        model = DDT(DDTConfig(**mc))
    elif ckpt.meta.get("model_class") == "DiCo":  # a diffusion ConvNet (flowdit.models.dico)
        model = DiCo(DiCoConfig(**dict(mc, depth=tuple(mc["depth"]))))
    else:
        model = DiT(DiTConfig(**mc))
    which = "ema" if use_ema else "model"
    if which not in ckpt.tensors:
        raise CheckpointError(f"{ckpt.path}: no {which}.safetensors in checkpoint")
    bad = nonfinite_tensors({which: ckpt.tensors[which]})
    if bad:
        raise CheckpointError(f"{ckpt.path}: {len(bad)} {which} weight tensors hold NaN or inf (first {bad[0]}); "
                              "refused: the run diverged before this checkpoint")
    if "compression" in ckpt.meta:  # a post-training quantized run (flowdit compress quantize)
        try:
            apply_quantized(model, ckpt.meta["compression"], ckpt.tensors[which])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: quantized weights do not match the manifest ({e})") from None
        return model.eval(), ckpt.meta
    if ckpt.meta.get("adapter", {}).get("method") == "affiner":  # flowdit compress adapt --method affiner
        try:
            apply_adapters(model, ckpt.meta["adapter"])
        except (KeyError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{ckpt.path}: adapter entry of the manifest does not fit the model ({e})") from None
    load_state_dict_strict(model, ckpt.tensors[which], which)
    return model.eval(), ckpt.meta
