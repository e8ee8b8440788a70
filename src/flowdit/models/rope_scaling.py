"""Resolution extrapolation for rotary positions: sampling a RoPE transformer on a larger
patch grid than it was trained on.

Each method rescales the per-axis RoPE frequencies ``w_i = theta^(-2i / d)`` (``d`` the
channels of one axis, ``i = 0 .. d/2 - 1``) by an extrapolation factor ``s >= 1`` (test
length over train length along that axis). Notation: ``w_i`` the trained frequencies,
``w'_i`` the rescaled ones; flowdit's time ``t`` (``t = 0`` data, ``t = 1`` noise).

* ``"linear"``, position interpolation (Chen et al. 2023, "Extending Context Window of
  Large Language Models via Positional Interpolation"): ``w'_i = w_i / s``;
  positions are squeezed back into the trained range. FiT's ``custom_freqs="linear"``
  (whlzy/FiT ``fit/model/rope.py``, ``VisionRotaryEmbedding.get_1d_rope_freqs``).
* ``"ntk"``, NTK-aware scaling (bloc97 2023; described in the YaRN paper, Peng et al. 2023):
  the base grows, ``theta' = theta s^(d / (d - 2))``, so the highest frequency is kept and
  the lowest one is divided by exactly ``s``. FiTv2's *VisionNTK* (``custom_freqs=
  "ntk-aware"``, ``find_newbase_ntk``) with one factor per axis (``decouple=True``, as
  FiTv2's high-resolution configs ``configs/fitv2/config_fitv2_hr_*.yaml`` set it).
* ``"yarn"``, YaRN's NTK-by-parts ramp (Peng et al. 2023, "YaRN: Efficient Context
  Window Extension of Large Language Models") and its attention temperature ``T``,
  ``sqrt(1/T) = 0.1 ln s + 1``, as FiTv2's *VisionYaRN* computes them
  (``custom_freqs="yarn"``: ``find_correction_range`` with ``beta_fast = 32``,
  ``beta_slow = 1`` and the train grid side as the context length, ``linear_ramp_mask``,
  ``get_mscale``; the factor multiplies ``cos`` and ``sin``, hence every query and key).
* ``"lumina"``, Lumina-Next's time-aware scaled RoPE (Zhuo et al. 2024, "Lumina-Next:
  Making Lumina-T2X Stronger and Faster with Next-DiT", the resolution-extrapolation
  section), as first released
  (Alpha-VLLM/Lumina-T2X ``lumina_next_t2i/models/model.py``,
  ``NextDiT.precompute_freqs_cis(dim, end, theta, scale_factor, timestep)``, commits
  1ef2b66 .. 3942ab3): with Lumina's time ``tau = 1 - t`` (``tau = 0`` noise) and ``D``
  the channels of a two-axis head (``D = 2 d``), ``d_tau = tau D + 1``,
  ``theta_tau = theta s^(D / d_tau)`` and ``w'_i = max(w_i / s, theta_tau^(-2i/d))``:
  interpolation at the noise end (``theta_tau`` huge; only ``w_0 = 1`` is kept), close
  to NTK-aware scaling at the data end.
* ``"lumina_watershed"``, the same function after commit 9b632c0 ("update rope
  extrapolation", the current one, with ``scale_watershed``): interpolation
  ``w_i / s`` while ``tau < watershed`` (default 0.3 in ``lumina_next_t2i/sample.py``,
  ``--scaling_watershed``), then ``theta' = theta s`` (the base times ``s``, not
  ``s^(d/(d-2))``).

Lumina-Next's factor is one number for both axes, ``s = sqrt(H W / (H_0 W_0))``
(``sample.py``: ``math.sqrt(w * h / train_args.image_size**2)``, only when extrapolating);
the FiT methods use one per axis. :func:`extrapolation_factors` returns them, clamped to
``>= 1`` as both references do.

Proportional attention (Lumina-Next, ``Attention.forward`` with ``proportional_attn``):
the softmax scale becomes ``sqrt(log_{N_0}(N) / Dh)`` for ``N`` image tokens and ``N_0``
at the train size, :func:`proportional_attention_scale`.

Lumina's sampler shift (``lumina_next_t2i/transport/integrators.py``, ``ode.__init__``:
``t / (t + s - s t)`` on Lumina's grid) is flowdit's ``shift_time(t, s)`` in flowdit's
time: :func:`lumina_time` converts.

The Lumina-Next paper also describes a frequency-aware variant (a ``d_target`` where the
wavelength matches the train length); no separate function for it appears in the released
code, so it is not reproduced here.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from ..errors import ConfigError

__all__ = [
    "ROPE_SCALINGS",
    "TIME_AWARE_SCALINGS",
    "rope_base_frequencies",
    "linear_frequencies",
    "ntk_frequencies",
    "yarn_frequencies",
    "yarn_mscale",
    "lumina_time_aware_frequencies",
    "lumina_watershed_frequencies",
    "lumina_time",
    "axis_frequencies",
    "extrapolation_factors",
    "scaled_rope_frequencies",
    "proportional_attention_scale",
]

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "lumina", "lumina_watershed")
"""Names accepted by ``MMDiTConfig.rope_scaling``."""

TIME_AWARE_SCALINGS = ("lumina", "lumina_watershed")
"""The methods whose frequencies depend on the time ``t``."""


def _check(dim: int, factor: float) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
        raise ConfigError(f"a RoPE axis needs an even number of channels >= 2, got {dim!r}")
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"RoPE extrapolation factor must be a positive number, got {factor!r}")


def rope_base_frequencies(dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """The trained frequencies of one axis, ``w_i = theta^(-2i / dim)``, ``[dim // 2]`` float64
    (the expression of ``flowdit.models.mmdit.rope_frequencies``)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


def linear_frequencies(dim: int, factor: float, theta: float = 10000.0, device=None) -> torch.Tensor:
    """Position interpolation, ``w_i / s``, ``[dim // 2]`` float64 (FiT ``custom_freqs="linear"``;
    Lumina-Next's ``linear_factor`` branch)."""
    _check(dim, factor)
    return rope_base_frequencies(dim, theta, device) / factor


def ntk_frequencies(dim: int, factor: float, theta: float = 10000.0, device=None) -> torch.Tensor:
    """NTK-aware scaling, ``(theta s^(dim / (dim - 2)))^(-2i / dim)``, ``[dim // 2]`` float64.

    FiT's ``find_newbase_ntk(dim, base, scale) = base * scale ** (dim / (dim - 2))``; the
    first frequency stays 1 and the last is the trained one divided by ``s``. A 2-channel
    axis (one frequency, 1) is returned unchanged."""
    _check(dim, factor)
    if dim == 2:
        return rope_base_frequencies(dim, theta, device)
    return rope_base_frequencies(dim, theta * factor ** (dim / (dim - 2)), device)


def _yarn_correction_dim(num_rotations: float, dim: int, theta: float, train_len: float) -> float:
    """The (fractional) channel index whose wavelength fits ``num_rotations`` turns in ``train_len``
    (FiT ``find_correction_factor``): ``dim ln(L / (2 pi r)) / (2 ln theta)``."""
    return dim * math.log(train_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_frequencies(dim: int, factor: float, train_len: float, theta: float = 10000.0, beta_fast: float = 32.0,
                     beta_slow: float = 1.0, device=None) -> torch.Tensor:
    """YaRN's NTK-by-parts frequencies, ``[dim // 2]`` float64.

    ``low = max(floor(c(beta_fast)), 0)``, ``high = min(ceil(c(beta_slow)), dim - 1)`` with
    ``c`` the correction dimension of ``train_len`` (the train grid side along the axis);
    ``gamma_i = 1 - clamp((i - low) / (high - low), 0, 1)`` (``high`` nudged by 0.001 when
    equal); ``w'_i = (w_i / s) (1 - gamma_i) + w_i gamma_i``: the fast channels keep their
    frequency, the slow ones are interpolated (FiT ``find_correction_range``,
    ``linear_ramp_mask``, the ``"yarn"`` branch of ``get_1d_rope_freqs``)."""
    _check(dim, factor)
    if not (math.isfinite(train_len) and train_len > 0):
        raise ConfigError(f"YaRN needs a positive train length, got {train_len!r}")
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, theta, train_len)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, theta, train_len)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    base = rope_base_frequencies(dim, theta, device)
    return base / factor * (1 - keep) + base * keep


def yarn_mscale(factor: float) -> float:
    """YaRN's magnitude factor ``0.1 ln s + 1`` (1 for ``s <= 1``), FiT ``get_mscale``; it
    multiplies ``cos`` and ``sin``, so every attention logit by its square."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def lumina_time(t: float) -> float:
    """Lumina-T2X's time ``tau = 1 - t`` of flowdit's ``t`` (Lumina's path is ``x_tau = tau x_data +
    (1 - tau) noise``, ``lumina_next_t2i/transport/path.py``), and back (the map is its own
    inverse). Lumina's sampler shift ``tau / (tau + s - s tau)`` is then ``shift_time(t, s)``."""
    return 1.0 - t


def lumina_time_aware_frequencies(dim: int, factor: float, t: float, theta: float = 10000.0,
                                  device=None) -> torch.Tensor:
    """Lumina-Next's time-aware scaled RoPE (first release), ``[dim // 2]`` float64.

    ``dim`` is one axis's channels; Lumina's ``precompute_freqs_cis`` takes the head
    dimension ``D`` of its two-axis RoPE, ``D = 2 dim``. With ``tau = 1 - t``:
    ``d_tau = tau D + 1``, ``theta_tau = theta s^(D / d_tau)``,
    ``w'_i = max(w_i / s, theta_tau^(-2i / dim))``."""
    _check(dim, factor)
    head = 2 * dim
    target_dim = lumina_time(float(t)) * head + 1
    inter = rope_base_frequencies(dim, theta, device) / factor
    scaled = rope_base_frequencies(dim, theta * factor ** (head / target_dim), device)
    return torch.maximum(inter, scaled)


def lumina_watershed_frequencies(dim: int, factor: float, t: float, theta: float = 10000.0, watershed: float = 0.3,
                                 device=None) -> torch.Tensor:
    """Lumina-Next's current ``precompute_freqs_cis`` (``scale_watershed``), ``[dim // 2]`` float64:
    ``w_i / s`` while Lumina's time ``1 - t < watershed`` (the noisy start), else the base
    times ``s``, ``(theta s)^(-2i / dim)``."""
    _check(dim, factor)
    if lumina_time(float(t)) < watershed:
        return rope_base_frequencies(dim, theta, device) / factor
    return rope_base_frequencies(dim, theta * factor, device)


def axis_frequencies(method: str, dim: int, factor: float, theta: float = 10000.0, train_len: Optional[float] = None,
                     t: Optional[float] = None, watershed: float = 0.3, device=None) -> torch.Tensor:
    """The frequencies ``[dim // 2]`` float64 of one axis under ``method`` (one of
    :data:`ROPE_SCALINGS`); ``train_len`` is needed by ``"yarn"``, ``t`` by the Lumina methods."""
    if method == "none":
        return rope_base_frequencies(dim, theta, device)
    if method == "linear":
        return linear_frequencies(dim, factor, theta, device)
    if method == "ntk":
        return ntk_frequencies(dim, factor, theta, device)
    if method == "yarn":
        if train_len is None:
            raise ConfigError("rope scaling 'yarn' needs the train length of the axis")
        return yarn_frequencies(dim, factor, train_len, theta, device=device)
    if method in TIME_AWARE_SCALINGS:
        if t is None:
            raise ConfigError(f"rope scaling {method!r} depends on the time: pass t")
        if method == "lumina":
            return lumina_time_aware_frequencies(dim, factor, t, theta, device)
        return lumina_watershed_frequencies(dim, factor, t, theta, watershed, device)
    raise ConfigError(f"unknown rope scaling {method!r}; valid: {', '.join(ROPE_SCALINGS)}")


def extrapolation_factors(method: str, grid: Sequence[int], train_grid: Sequence[int]) -> tuple[float, ...]:
    """Per-axis factors ``s_a >= 1`` for a patch grid ``(h, w)`` sampled by a model trained on
    ``train_grid`` ``(h_0, w_0)``: ``max(h / h_0, 1)``, ``max(w / w_0, 1)`` for the FiT methods
    (``decouple=True``), one ``max(sqrt(h w / (h_0 w_0)), 1)`` for both axes for Lumina's."""
    if len(grid) != len(train_grid):
        raise ConfigError(f"grid {tuple(grid)} and train grid {tuple(train_grid)} have different axes")
    if method in TIME_AWARE_SCALINGS:
        s = max(math.sqrt(math.prod(grid) / math.prod(train_grid)), 1.0)
        return tuple(s for _ in grid)
    return tuple(max(n / n0, 1.0) for n, n0 in zip(grid, train_grid))


def scaled_rope_frequencies(ids: torch.Tensor, axes_dims: Iterable[int], theta: float, method: str,
                            factors: Sequence[float], train_lens: Sequence[float], t: Optional[float] = None,
                            watershed: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """``flowdit.models.mmdit.rope_frequencies`` with rescaled frequencies on the spatial axes.

    Args:
        ids: ``[N, A]`` position ids; axis 0 is FLUX's index axis (left as trained), axes
            ``1 .. A-1`` are spatial (row, column).
        axes_dims: channels per axis, as ``rope_frequencies``.
        theta: the trained base.
        method: one of :data:`ROPE_SCALINGS`.
        factors: ``A - 1`` extrapolation factors, one per spatial axis (:func:`extrapolation_factors`).
        train_lens: ``A - 1`` train grid sides (used by ``"yarn"``).
        t: flowdit time in ``[0, 1]`` for the Lumina methods.
        watershed: Lumina time of the ``"lumina_watershed"`` switch.
    Returns:
        ``cos, sin``, each ``[N, sum(axes_dims)]`` float32, pairs repeated as in
        ``rope_frequencies``; for ``"yarn"`` both multiplied by ``yarn_mscale(max(factors))``.
    """
    dims = list(axes_dims)
    if len(factors) != len(dims) - 1 or len(train_lens) != len(dims) - 1:
        raise ConfigError(f"need {len(dims) - 1} factors and train lengths for axes {tuple(dims)}")
    cos, sin = [], []
    for a, dim in enumerate(dims):
        if a == 0:
            freqs = rope_base_frequencies(dim, theta, ids.device)
        else:
            freqs = axis_frequencies(method, dim, factors[a - 1], theta, train_lens[a - 1], t, watershed, ids.device)
        angles = ids[:, a].double()[:, None] * freqs[None]
        cos.append(angles.cos().repeat_interleave(2, dim=1))
        sin.append(angles.sin().repeat_interleave(2, dim=1))
    cos, sin = torch.cat(cos, dim=1), torch.cat(sin, dim=1)
    if method == "yarn":
        m = yarn_mscale(max(factors))
        cos, sin = cos * m, sin * m
    return cos.float(), sin.float()


def proportional_attention_scale(num_tokens: int, train_tokens: int, head_dim: int) -> float:
    """Lumina-Next's proportional attention scale ``sqrt(log_{N_0}(N) / Dh)`` (``Attention.forward``
    with ``proportional_attn``: ``math.sqrt(math.log(seqlen, base_seqlen) / head_dim)``):
    the usual ``1 / sqrt(Dh)`` times ``sqrt(log N / log N_0)``, which keeps the attention
    entropy near its trained value as the token count ``N`` grows past ``N_0``."""
    for name, v in (("num_tokens", num_tokens), ("train_tokens", train_tokens), ("head_dim", head_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    if train_tokens < 2:
        raise ConfigError(f"proportional attention needs at least 2 train tokens, got {train_tokens}")
    return math.sqrt(math.log(num_tokens, train_tokens) / head_dim)
