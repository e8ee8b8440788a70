"""The public DiT and SiT checkpoints as flowdit velocity models.

Two public formats share one architecture, whose parameter names flowdit's
:class:`~flowdit.models.dit.DiT` already uses:

- **DiT** (Peebles & Xie 2023, facebookresearch/DiT): a DDPM epsilon predictor on the
  integer timestep ``tau in 0..999`` of the linear beta schedule (``1e-4 .. 0.02``), with
  ``2C`` output channels when the variance is learned (``learn_sigma``).
- **SiT** (Ma et al. 2024, willisma/SiT): a velocity model on the linear interpolant
  ``x_s = s x_data + (1 - s) noise`` with ``s = 0`` noise, target ``x_data - noise`` and
  ``s`` fed to the timestep embedder unscaled.

``load_dit_checkpoint`` and ``load_sit_checkpoint`` read such a checkpoint (a state dict,
or a ``.pt`` / ``.pth`` file) into a flowdit DiT and wrap it in :class:`DDPMEpsVelocity`
or :class:`SiTVelocity`, which are ``model(x, t, y, ctx=None) -> v`` in flowdit's
conventions (``t = 0`` data, ``t = 1`` noise, ``v = eps - x0``), so that flowdit's solvers,
``model_velocity`` and classifier-free guidance run on them unchanged.

Conversions (docs/interop.md, "Public DiT and SiT checkpoints"):

- DDPM: ``x_tau = alpha x0 + sigma eps`` with ``alpha = sqrt(abar_tau)``,
  ``sigma = sqrt(1 - abar_tau)``; flowdit's time ``t = sigma / (alpha + sigma)`` and state
  ``x_t = x_tau / (alpha + sigma) = (1 - t) x0 + t eps``.
- SiT: ``t = 1 - s``, same state, ``v = -v_SiT``.

The imported network is built with ``time_scale = 1``: both references feed their own
time (``tau``, or ``s``) straight into the same sinusoid (``[cos, sin]`` order,
``max_period = 10000``) as flowdit's ``TimestepEmbedder``; the attention is timm's
(fused ``qkv`` rows ordered ``(q|k|v, head, head_dim)``, scale ``head_dim ** -0.5``), which
is flowdit's.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from ..models.dit import DiT, DiTConfig

__all__ = [
    "DDIMGrid",
    "DDPMEpsVelocity",
    "DIT_NUM_HEADS",
    "SiTVelocity",
    "ddim_grid",
    "ddim_timesteps",
    "dit_from_state_dict",
    "linear_alphas_cumprod",
    "load_dit_checkpoint",
    "load_sit_checkpoint",
    "read_state_dict",
    "split_learned_sigma",
]

# Heads of the public model sizes (DiT / SiT -S, -B, -L, -XL), by hidden size. The number
# of heads is not in the weights (``qkv`` is ``[3D, D]`` whatever the split), so it comes
# from this table or from the caller.
DIT_NUM_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}

_SUFFIXES = (".pt", ".pth")
_INFER_KEYS = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
)


# --------------------------------------------------------------------------- reading


def read_state_dict(src: Any) -> tuple[dict[str, Tensor], str]:
    """The state dict of a checkpoint and a one-line description of where it came from.

    Args:
        src: a mapping of parameter names to tensors, or the path of a ``.pt`` / ``.pth``
            file read with ``torch.load(weights_only=True)``. A mapping (or file) holding
            ``"ema"`` (the reference ``train.py`` checkpoints: ``{"model", "ema", "opt",
            "args"}``) yields its EMA weights, which the public release and the
            references' ``find_model`` use; else ``"model"`` if present; else the mapping
            itself (the released files are plain state dicts).

    Returns:
        ``(state_dict, source)``, e.g. ``("…", "ckpt.pt ('ema' weights)")``.

    Raises:
        CheckpointError: a missing, unreadable, corrupt or non-state-dict file, in one line
        that names it.
    """
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = str(path)
        if path.suffix.lower() not in _SUFFIXES:
            raise CheckpointError(f"{name}: expected a .pt or .pth checkpoint, got suffix {path.suffix or '(none)'!r}")
        if not path.is_file():
            raise CheckpointError(f"{name}: no such checkpoint file")
        try:
            # The reference train.py saves its argparse options next to the weights; that
            # class is allowed, nothing else beyond tensors and containers.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # corrupt, truncated, or holding foreign objects
            raise CheckpointError(f"{name}: not a readable torch checkpoint ({_one_line(e)})") from None
    else:
        obj, name = src, "state dict"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    source = name
    for group in ("ema", "model"):
        if isinstance(obj.get(group), Mapping):
            obj, source = obj[group], f"{name} ({group!r} weights)"
            break
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad or not obj:
        what = "is empty" if not obj else "has non-tensor entries: " + _names(bad)
        raise CheckpointError(f"{source}: not a state dict of tensors, it {what}")
    return dict(obj), source


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0] if lines else type(e).__name__)
    text = text.split(" Please use", 1)[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _names(items: list[str], show: int = 6) -> str:
    more = f", ... (+{len(items) - show} more)" if len(items) > show else ""
    return ", ".join(items[:show]) + more


# --------------------------------------------------------------------------- weights


def split_learned_sigma(weight: Tensor, bias: Tensor, channels: int, patch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split a learned-sigma output layer into its epsilon and its variance rows.

    The references' ``unpatchify`` reshapes a token's ``p * p * 2C`` outputs as
    ``(p, q, c)`` with ``c`` fastest, so row ``(i p + j) 2C + c`` is pixel ``(i, j)`` of
    channel ``c``: the variance channels ``C..2C`` are interleaved with the epsilon ones
    every ``2C`` rows, not the last half of the rows.

    Args:
        weight: ``final_layer.linear.weight`` ``[p * p * 2C, D]``.
        bias: ``final_layer.linear.bias`` ``[p * p * 2C]``.
        channels: ``C``, the input channels.
        patch_size: ``p``.

    Returns:
        ``(eps_weight [p*p*C, D], eps_bias [p*p*C], sigma_weight, sigma_bias)``.
    """
    pp, c2 = patch_size * patch_size, 2 * channels
    if weight.shape[0] != pp * c2 or bias.shape != (pp * c2,):
        raise ConfigError(
            f"final_layer.linear has {weight.shape[0]} rows, expected p*p*2C = {pp * c2} for a learned-sigma output"
        )
    w = weight.reshape(pp, c2, -1)
    b = bias.reshape(pp, c2)
    return (w[:, :channels].reshape(pp * channels, -1), b[:, :channels].reshape(-1),
            w[:, channels:].reshape(pp * channels, -1), b[:, channels:].reshape(-1))


def _config_from_weights(sd: Mapping[str, Tensor], num_heads: Optional[int], num_classes: Optional[int],
                         source: str) -> tuple[DiTConfig, bool]:
    absent = [k for k in _INFER_KEYS if k not in sd]
    if absent:
        raise ConfigError(f"{source}: not a DiT/SiT state dict, missing keys: {_names(absent)}")
    w = sd["x_embedder.proj.weight"]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ConfigError(f"{source}: x_embedder.proj.weight has shape {list(w.shape)}, expected [D, C, p, p]")
    hidden, channels, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    tokens = sd["pos_embed"].shape[-2] if sd["pos_embed"].ndim >= 2 else -1
    grid = math.isqrt(max(int(tokens), 0))
    if grid * grid != tokens:
        raise ConfigError(f"{source}: pos_embed has shape {list(sd['pos_embed'].shape)}, expected [1, N, D] with N a square")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    rows = int(sd["final_layer.linear.weight"].shape[0])
    if rows == 2 * patch * patch * channels:
        learn_sigma = True
    elif rows == patch * patch * channels:
        learn_sigma = False
    else:
        raise ConfigError(
            f"{source}: final_layer.linear has {rows} rows, expected p*p*C = {patch * patch * channels} "
            f"or p*p*2C = {2 * patch * patch * channels} (learned sigma)"
        )
    table = int(sd["y_embedder.embedding_table.weight"].shape[0])
    if num_classes is None:
        num_classes = table - 1
    elif table != num_classes + 1:
        raise ConfigError(
            f"{source}: y_embedder.embedding_table has {table} rows, expected num_classes + 1 = {num_classes + 1} "
            "(the last row is the null class of classifier-free guidance; a model trained without class "
            "dropout has none, and flowdit's DiT needs it)"
        )
    if num_heads is None:
        if hidden not in DIT_NUM_HEADS:
            raise ConfigError(
                f"{source}: hidden size {hidden} is not a public DiT/SiT size ({sorted(DIT_NUM_HEADS)}); "
                "the number of heads cannot be read from the weights, pass num_heads"
            )
        num_heads = DIT_NUM_HEADS[hidden]
    mlp_hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    config = DiTConfig(
        input_size=grid * patch, in_channels=channels, patch_size=patch, hidden_size=hidden, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=num_classes, qk_norm=False,
        # Both references feed their own time (DDPM index, or SiT's s) to the sinusoid as it is.
        time_scale=1.0,
    )
    return config, learn_sigma


def dit_from_state_dict(state_dict: Mapping[str, Tensor], num_heads: Optional[int] = None,
                        num_classes: Optional[int] = None, output: str = "eps", source: str = "state dict") -> DiT:
    """A flowdit DiT holding the weights of a public DiT/SiT state dict, in the reference's own time.

    The architecture is read from the weights: hidden size ``D``, channels ``C`` and patch
    ``p`` from ``x_embedder.proj.weight [D, C, p, p]``, the input side from ``pos_embed
    [1, N, D]`` (``sqrt(N) p``), the depth from the ``blocks.N.`` keys, the MLP ratio from
    ``fc1``, the classes from ``y_embedder.embedding_table`` (``num_classes + 1`` rows, the
    last the null class), ``learn_sigma`` from the ``final_layer.linear`` rows (``p*p*C``
    or ``p*p*2C``). The heads are not in the weights: ``num_heads`` defaults to the public
    model of that hidden size (:data:`DIT_NUM_HEADS`; DiT-XL/2 and SiT-XL/2: 16).

    The result is a :class:`DiT` with ``time_scale = 1``, so ``net(x, tau, y)`` is the
    reference's ``forward(x, tau, y)`` (its first ``C`` channels): it is fed the DDPM
    timestep or SiT's time, not flowdit's ``t``; wrap it in :class:`DDPMEpsVelocity` or
    :class:`SiTVelocity` to sample with flowdit.

    Args:
        state_dict: the reference's parameter names to tensors.
        num_heads: attention heads (default: the public size's, see above).
        num_classes: checked against the embedding table if given.
        output: ``"eps"`` (the first ``C`` output channels: the prediction) or ``"sigma"``
            (channels ``C..2C`` of a learned-sigma model: the interpolation weight of the
            log-variance, which deterministic sampling does not use).
        source: the name used in error messages.

    Raises:
        ConfigError: keys that do not correspond one to one with flowdit's DiT (the
        missing and unexpected ones are named in one line), or shapes that do not fit.
    """
    if output not in ("eps", "sigma"):
        raise ConfigError(f"output must be 'eps' or 'sigma', got {output!r}")
    config, learn_sigma = _config_from_weights(state_dict, num_heads, num_classes, source)
    sd = dict(state_dict)
    if learn_sigma and "final_layer.linear.bias" in sd:  # a missing bias is reported below
        ew, eb, sw, sb = split_learned_sigma(sd["final_layer.linear.weight"], sd["final_layer.linear.bias"],
                                             config.in_channels, config.patch_size)
        sd["final_layer.linear.weight"], sd["final_layer.linear.bias"] = (ew, eb) if output == "eps" else (sw, sb)
    if output == "sigma" and not learn_sigma:
        raise ConfigError(f"{source}: output='sigma' needs a learned-sigma checkpoint (p*p*2C output rows); this one has p*p*C")
    net = DiT(config)
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = [f"missing {_names(missing)}" if missing else "", f"unexpected {_names(unexpected)}" if unexpected else ""]
        raise ConfigError(f"{source}: keys do not match flowdit's DiT: " + "; ".join(p for p in parts if p))
    shapes = [f"{k} {list(sd[k].shape)} vs {list(v.shape)}" for k, v in expected.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if shapes:
        raise ConfigError(f"{source}: shapes do not match flowdit's DiT (checkpoint vs model): {_names(shapes)}")
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    net.learn_sigma = learn_sigma
    return net.eval()


# --------------------------------------------------------------------------- DDPM time


def linear_alphas_cumprod(num_timesteps: int = 1000) -> Tensor:
    """``abar_tau = prod_{s <= tau} (1 - beta_s)`` of DDPM's linear schedule, float64 ``[T]``.

    ``beta = linspace(1e-4 k, 0.02 k, T)`` with ``k = 1000 / T`` (the reference's
    ``get_named_beta_schedule("linear", T)``).
    """
    k = 1000.0 / num_timesteps
    betas = np.linspace(k * 1e-4, k * 0.02, num_timesteps, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas))


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """The DDPM timesteps a respaced ``steps``-step sampler visits, increasing ``[steps]``.

    Evenly spaced strides over ``0..T-1`` rounded to integers, as the reference's
    ``space_timesteps(T, str(steps))`` (one section): ``round(i (T - 1) / (steps - 1))``
    accumulated in floating point, so ``0`` and ``T - 1`` are always included.
    """
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ConfigError(f"DDIM steps must be an integer in 1..{num_timesteps}, got {steps!r}")
    stride = 1.0 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    out, pos = [], 0.0
    for _ in range(steps):
        out.append(round(pos))
        pos += stride
    return out


class DDIMGrid(NamedTuple):
    """A DiT-native sampling grid in flowdit's time (see :func:`ddim_grid`)."""

    times: Tensor  # float64 [steps + 1], decreasing, ending at 0
    timesteps: Tensor  # int64 [steps], decreasing DDPM indices, one per step
    noise_scale: float  # start from noise * noise_scale at times[0]


def _ddpm_times(abar: Tensor) -> Tensor:
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return sigma / (alpha + sigma)


def ddim_grid(steps: int, alphas_cumprod: Optional[Tensor] = None) -> DDIMGrid:
    """The flowdit grid on which Euler through :class:`DDPMEpsVelocity` is DDIM (eta = 0).

    With ``tau_0 < ... < tau_{N-1}`` from :func:`ddim_timesteps`, the grid is
    ``t_i = sigma / (alpha + sigma)`` at ``tau_{N-1}, ..., tau_0`` followed by ``0``
    (DDIM's last step lands on ``abar = 1``). DDIM starts from ``x_T = z ~ N(0, I)`` at
    ``tau_{N-1}``; flowdit's state there is ``z / (alpha + sigma)``, so sample from
    ``noise * noise_scale`` with ``noise_scale = 1 / (alpha_T + sigma_T)``. Since
    ``abar_{999} > 0``, ``t = 1`` is not reachable: the grid starts at ``t(999) ~ 0.9937``.

    Args:
        steps: number of sampling steps ``N`` (1..T).
        alphas_cumprod: the schedule (default :func:`linear_alphas_cumprod`).

    Returns:
        ``DDIMGrid(times [N + 1] float64, timesteps [N] int64, noise_scale)``; pass
        ``schedule=times`` to ``flowdit.sampling.sample``.
    """
    abar = linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double()
    taus = torch.tensor(ddim_timesteps(steps, abar.numel())[::-1], dtype=torch.long)
    times = torch.cat([_ddpm_times(abar)[taus], torch.zeros(1, dtype=torch.float64)])
    a, s = abar[taus[0]].sqrt(), (1 - abar[taus[0]]).sqrt()
    return DDIMGrid(times, taus, float(1.0 / (a + s)))


def _broadcast(v: Tensor, x: Tensor) -> Tensor:
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _batch_time(t: Any, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class _ImportedDiT(nn.Module):
    """What flowdit's samplers and guidance read of a model, passed through from the
    wrapped network ``self.net``."""

    in_channels = property(lambda self: self.net.in_channels)
    out_channels = property(lambda self: self.net.out_channels)
    num_classes = property(lambda self: self.net.num_classes)
    null_class = property(lambda self: self.net.null_class)
    config = property(lambda self: self.net.config)


class DDPMEpsVelocity(_ImportedDiT):
    """A DDPM epsilon predictor as a flowdit velocity model ``model(x, t, y, ctx=None) -> v``.

    For flowdit's ``t`` the DDPM coordinates are ``sigma / alpha = t / (1 - t)`` with
    ``alpha^2 + sigma^2 = 1``; the network runs on ``x_tau = x_t (alpha + sigma)`` at the
    (fractional) DDPM timestep ``tau(t)`` and its ``eps_hat`` becomes
    ``x0_hat = (x_tau - sigma eps_hat) / alpha`` and ``v = eps_hat - x0_hat``
    (equivalently ``(eps_hat - x_t) / (1 - t)``).

    ``tau(t)``: linear interpolation, over the ``T`` discrete steps, of the monotone
    ``log(sigma_tau / alpha_tau)``; a ``t`` equal (in its own dtype) to the time of an
    integer step uses that step and its exact ``alpha``, ``sigma``, so that a float32 time
    on :func:`ddim_grid` feeds the same integer timesteps as the reference (the rounding of
    a float32 ``t`` near ``t(999)`` would otherwise move ``tau`` by up to ~5e-4).

    Range: ``t`` above ``t(T-1)`` (``~0.9937`` for the linear schedule; ``t = 1`` included)
    is refused, since the model never saw less signal than ``abar_{T-1}``; start sampling
    from :func:`ddim_grid`. Below ``t(0)`` (``~0.0099``) ``tau`` is clamped to ``0`` while
    ``alpha``, ``sigma`` follow ``t`` (so ``t = 0`` is finite, for solvers that evaluate
    the end point).

    Shapes: ``x [B, C, H, W]``, ``t`` a float ``[B]`` or scalar, ``y [B]`` class indices
    (``None``: the null class). Attributes for flowdit's guidance and loops:
    ``in_channels``, ``num_classes``, ``null_class``, ``net`` (the DiT in DDPM time),
    ``alphas_cumprod``, ``source``, ``learn_sigma`` (whether variance channels were
    dropped). ``ctx`` is passed on to the DiT (block policies are not tested here).
    """

    def __init__(self, net: DiT, alphas_cumprod: Optional[Tensor] = None, source: str = ""):
        super().__init__()
        if getattr(net.config, "time_scale", None) != 1.0:
            raise ConfigError(
                f"DDPMEpsVelocity needs a DiT fed the DDPM timestep (time_scale = 1), got time_scale={net.config.time_scale}"
            )
        self.net = net
        abar = linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double().cpu()
        self.alphas_cumprod = abar  # float64, CPU: not a buffer, so .to() never rounds it
        self._alpha, self._sigma = abar.sqrt(), (1 - abar).sqrt()
        self._times = self._sigma / (self._alpha + self._sigma)
        self._log_ratio = (self._sigma / self._alpha).log()
        self.source = source
        self.learn_sigma = bool(getattr(net, "learn_sigma", False))


    @property
    def t_range(self) -> tuple[float, float]:
        """``(t(0), t(T-1))``: flowdit's times of the first and last DDPM steps."""
        return float(self._times[0]), float(self._times[-1])

    def ddpm_coordinates(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(tau, alpha, sigma)``, each float64 ``[B]`` on the CPU, for flowdit times ``t [B]``.

        Raises:
            ConfigError: a ``t`` outside ``[0, t(T-1)]`` or not finite.
        """
        t_hi = self._times[-1].to(t.dtype)
        bad = ~torch.isfinite(t) | (t < 0) | (t > t_hi.to(t.device))
        if bool(bad.any()):
            v = float(t[bad][0])
            raise ConfigError(
                f"t = {v:.6g} is outside the DDPM model's range [0, {float(self._times[-1]):.6g}] "
                "(abar > 0 at its last step, so t = 1 is not reachable): sample on ddim_grid(steps), "
                "starting from noise * noise_scale"
            )
        t_in = t.detach().cpu()
        t64 = t_in.double()
        ratio = t64 / (1 - t64)
        alpha = (1 + ratio * ratio).rsqrt()
        sigma = ratio * alpha
        lr, q = self._log_ratio, ratio.log()
        idx = torch.searchsorted(lr, q).clamp(1, lr.numel() - 1)
        lo, hi = lr[idx - 1], lr[idx]
        tau = (idx - 1).double() + ((q - lo) / (hi - lo)).clamp(0, 1)
        # A time that is an integer step at its own precision takes that step exactly.
        k = tau.round().long().clamp(0, lr.numel() - 1)
        exact = self._times[k].to(t_in.dtype) == t_in
        tau = torch.where(exact, k.double(), tau)
        alpha = torch.where(exact, self._alpha[k], alpha)
        sigma = torch.where(exact, self._sigma[k], sigma)
        return tau, alpha, sigma

    def forward(self, x: Tensor, t: Any, y: Optional[Tensor] = None, ctx: Any = None) -> Tensor:
        """Velocity ``v = eps_hat - x0_hat [B, C, H, W]`` at flowdit's ``(x_t, t)``."""
        t = _batch_time(t, x)
        tau, alpha, sigma = self.ddpm_coordinates(t)
        x_tau = x * _broadcast(alpha + sigma, x)
        eps = self.net(x_tau, tau.to(device=x.device, dtype=torch.float32), y, ctx=ctx)
        x0 = (x_tau - _broadcast(sigma, x) * eps) / _broadcast(alpha, x)
        return eps - x0


class SiTVelocity(_ImportedDiT):
    """A SiT velocity model in flowdit's conventions: ``v(x, t) = -v_SiT(x, 1 - t)``.

    SiT's linear path is ``x_s = s x_data + (1 - s) noise`` (``s = 0`` noise) with target
    ``x_data - noise``; with ``t = 1 - s`` it is flowdit's ``(1 - t) x0 + t eps`` and
    ``eps - x0 = -(x_data - noise)``. The state is unchanged and every ``t`` in ``[0, 1]``
    is valid. Shapes: ``x [B, C, H, W]``, ``t`` float ``[B]`` or scalar, ``y [B]``.
    Attributes: ``in_channels``, ``num_classes``, ``null_class``, ``net`` (the DiT in
    SiT's time), ``source``, ``learn_sigma``.
    """

    def __init__(self, net: DiT, source: str = ""):
        super().__init__()
        if getattr(net.config, "time_scale", None) != 1.0:
            raise ConfigError(f"SiTVelocity needs a DiT fed SiT's time unscaled (time_scale = 1), got {net.config.time_scale}")
        self.net = net
        self.source = source
        self.learn_sigma = bool(getattr(net, "learn_sigma", False))


    def forward(self, x: Tensor, t: Any, y: Optional[Tensor] = None, ctx: Any = None) -> Tensor:
        """Velocity ``v = eps - x0 [B, C, H, W]`` at flowdit's ``(x_t, t)``."""
        t = _batch_time(t, x)
        return -self.net(x, 1 - t, y, ctx=ctx)


# --------------------------------------------------------------------------- loaders


def load_dit_checkpoint(src: Any, num_heads: Optional[int] = None, num_classes: Optional[int] = None,
                        alphas_cumprod: Optional[Tensor] = None) -> DDPMEpsVelocity:
    """A facebookresearch/DiT checkpoint as a flowdit velocity model.

    ``load_dit_checkpoint("DiT-XL-2-256x256.pt")`` reads the weights
    (:func:`read_state_dict`: a state dict or a ``.pt`` / ``.pth`` file, its ``"ema"``
    weights when it has them), builds the DiT (:func:`dit_from_state_dict`: architecture
    from the weights, ``num_heads`` from the public sizes unless given, the learned-sigma
    channels dropped) and wraps it in :class:`DDPMEpsVelocity` on the linear 1000-step
    schedule. Sample with :func:`ddim_grid`::

        model = load_dit_checkpoint(path)
        grid = ddim_grid(50)
        fn = model_velocity(model, y, cfg_scale=4.0)
        latent = sample(fn, torch.randn(B, 4, 32, 32) * grid.noise_scale, schedule=grid.times).x

    The latent is sd-vae's (``vae.decode(latent / 0.18215)``), which flowdit does not ship.

    Raises:
        CheckpointError: an unreadable file; ConfigError: weights that do not map onto
        flowdit's DiT (named in one line).
    """
    sd, source = read_state_dict(src)
    net = dit_from_state_dict(sd, num_heads=num_heads, num_classes=num_classes, source=source)
    return DDPMEpsVelocity(net, alphas_cumprod=alphas_cumprod, source=source)


def load_sit_checkpoint(src: Any, num_heads: Optional[int] = None, num_classes: Optional[int] = None) -> SiTVelocity:
    """A willisma/SiT (linear path, velocity prediction) checkpoint as a flowdit velocity model.

    Reads and builds as :func:`load_dit_checkpoint` (same architecture and keys; the
    released SiT-XL/2 256 checkpoint has learned-sigma output rows, which SiT's own forward
    drops as flowdit does) and wraps the DiT in :class:`SiTVelocity`. Flowdit's default grid
    ``1 -> 0`` is SiT's ODE grid ``0 -> 1`` reversed; the noise is used as it is. Only the
    linear path with velocity prediction (SiT's default) has this exact wrapper; GVP / VP
    paths or noise / score predictions are other conversions, not provided.
    """
    sd, source = read_state_dict(src)
    net = dit_from_state_dict(sd, num_heads=num_heads, num_classes=num_classes, source=source)
    return SiTVelocity(net, source=source)
