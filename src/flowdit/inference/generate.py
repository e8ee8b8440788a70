"""Generate class-conditional samples from a velocity model, in batches, reproducibly.

The noise of sample ``i`` is drawn from a generator seeded by ``(seed, i)``, so a given
seed yields the same image for index ``i`` whatever the batch size or the number of
processes that share the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..sampling.context import BlockPolicy, StepContext
from ..sampling.sample import sample
from ..utils.seeding import seeded_generator
from .velocity import model_velocity

__all__ = ["Generated", "balanced_labels", "generate", "indexed_noise"]


def indexed_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal noise ``[len(indices), *shape]``, row ``j`` a function of ``(seed, indices[j])`` only."""
    out = torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        out[j] = torch.randn(*shape, generator=seeded_generator(seed, 0x5EED, i))
    return out


def balanced_labels(num_classes: int, n: int) -> torch.Tensor:
    """``[n]`` labels cycling through the classes (as even as ``n`` allows), class-major order
    when ``n`` is a multiple of ``num_classes``."""
    per = -(-n // num_classes)
    return torch.arange(num_classes).repeat_interleave(per)[:n]


@dataclass
class Generated:
    """Samples ``images [N, C, H, W]`` in ``[-1, 1]`` (float32, CPU), their ``labels [N]``,
    and the velocity evaluations per sample (``nfe``)."""

    images: torch.Tensor
    labels: torch.Tensor
    nfe: int


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    labels: torch.Tensor,
    shape: Sequence[int],
    solver: str = "heun",
    steps: int = 16,
    cfg_scale: float = 1.0,
    guidance_interval: Optional[tuple[float, float]] = None,
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    amp_dtype: Optional[torch.dtype] = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    first_index: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    accel: Optional[BlockPolicy] = None,
    null=None,
    clamp: bool = True,
) -> Generated:
    """Sample one image per label by integrating the model's ODE from noise (t = 1) to data.

    Args:
        model: ``model(x, t, y) -> v`` with a ``null_class`` attribute for guidance.
        labels: ``[N]`` class indices, or a text condition: a dict of ``[N, ...]`` tensors
            (``tokens``, ``mask``, ``pooled``) for a text-conditioned model.
        shape: ``(C, H, W)`` of one sample.
        solver, steps, shift: passed to :func:`flowdit.sampling.sample.sample`.
        cfg_scale, guidance_interval: classifier-free guidance (scale 1 = conditional only).
        seed, first_index: sample ``j`` uses the noise of index ``first_index + j``.
        amp_dtype: autocast dtype for the model (``None`` = fp32).
        accel: a block policy (``flowdit.accel.build_policy("taylorseer:interval=4")``)
            that decides per model call how the block stack runs. Its state is reset
            for every batch, so a batch's result does not depend on earlier batches. A
            policy with a ``prepare(model, run_once, shape, key)`` method (DDT's dp encoder
            sharing) is first handed ``run_once(labels, noise)``, one sampling call of this
            setting with the policy in its context, to calibrate on.

        null: the unconditional branch's condition for guidance (a text model's empty-prompt
            condition, one row or ``N``); default the model's ``null_class``.
        clamp: clamp the results to ``[-1, 1]`` (pixels); off for latents.

    Returns:
        :class:`Generated` with ``images [N, *shape]`` (clamped to ``[-1, 1]`` by default).
    """
    if accel is not None and not callable(getattr(accel, "run", None)):
        raise TypeError(
            f"accel must be a block policy (flowdit.accel.build_policy(spec)), got {type(accel).__name__}"
        )
    device = torch.device(device)
    model.eval()
    text = isinstance(labels, dict)
    if not text:
        labels = torch.as_tensor(labels, dtype=torch.long)
    n = len(next(iter(labels.values()))) if text else len(labels)
    prepare = getattr(accel, "prepare", None)
    if callable(prepare):
        def run_once(y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            ctx = StepContext(block_policy=accel)
            velocity = model_velocity(model, y.to(device), cfg_scale, amp_dtype, ctx=ctx, interval=guidance_interval)
            return sample(velocity, noise.to(device), solver=solver, steps=steps, shift=shift, rtol=rtol, atol=atol,
                          step_context=ctx).x

        prepare(model, run_once, tuple(shape),
                (solver, steps, cfg_scale, guidance_interval, shift, str(amp_dtype), tuple(shape), str(device)))
    images, nfe = [], 0
    bar = tqdm(total=n, disable=not progress, desc=f"sample {solver}", unit="img", dynamic_ncols=True)
    for lo in range(0, n, batch_size):
        idx = list(range(first_index + lo, first_index + min(n, lo + batch_size)))
        noise = indexed_noise(idx, shape, seed).to(device)
        hi = lo + len(idx)
        y = {k: v[lo:hi].to(device) for k, v in labels.items()} if text else labels[lo:hi].to(device)
        ctx = StepContext(block_policy=accel) if accel is not None else None
        velocity = model_velocity(model, y, cfg_scale, amp_dtype, ctx=ctx, interval=guidance_interval,
                                  null=_rows(null, lo, hi, device))
        res = sample(velocity, noise, solver=solver, steps=steps, shift=shift, rtol=rtol, atol=atol,
                     step_context=ctx)
        x = res.x.float()
        images.append((x.clamp(-1, 1) if clamp else x).cpu())
        nfe = max(nfe, res.nfe)
        bar.update(len(idx))
    bar.close()
    return Generated(torch.cat(images) if images else torch.empty(0, *shape), labels, nfe)


def _rows(null, lo: int, hi: int, device):
    """The null condition's rows for a batch: all of a one-row one, else ``lo:hi``."""
    if null is None or not isinstance(null, dict):
        return null
    one = next(iter(null.values())).shape[0] == 1
    return {k: (v if one else v[lo:hi]).to(device) for k, v in null.items()}
