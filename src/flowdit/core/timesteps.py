"""Training-time distributions of t in [0, 1] (t = 0 data, t = 1 noise).

Each sampler has ``sample(n, generator=None, device=None) -> Tensor[n]`` (float32) and
``pdf(t)``, the exact density of what ``sample`` returns, so tests can check one
against the other. Every sampler takes an optional ``shift``: the SD3 resolution shift
``shift_time`` applied after sampling, the same function the sampling schedules use,
so train-time and sample-time shifts cannot drift apart.

References:
    Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
    Synthesis" (SD3): logit-normal (eq. 19), mode sampling with heavy tails (eq. 20),
    cosmap (eq. 21), resolution-dependent shift (eq. 23).
    Lee, Lin & Fanti 2024, "Improving the Training of Rectified Flows" (2-rectified
    flow++): U-shaped timestep distribution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowdit.errors import ConfigError

__all__ = [
    "shift_time",
    "resolution_shift",
    "dynamic_shift",
    "TimeSampler",
    "Uniform",
    "LogitNormal",
    "ModeSampling",
    "CosMap",
    "UShaped",
    "TIME_SAMPLERS",
    "build_time_sampler",
]


def shift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """SD3 resolution shift ``t' = shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, eq. 23).

    Monotone increasing on [0, 1] with fixed endpoints 0 and 1; ``shift > 1`` moves
    mass toward the noise end (t = 1), ``shift = 1`` is the identity. Its inverse is
    ``shift_time(., 1 / shift)``.

    Args:
        t: a float or a tensor of any shape, values in [0, 1].
        shift: a positive float.

    Returns:
        the shifted time, same type and shape as ``t``.
    """
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ConfigError(f"time shift must be a positive finite number, got shift={shift!r}")
    if shift == 1:
        return t
    # Same value as shift t / (1 + (shift - 1) t), written so that t = 1 maps to
    # exactly 1 in floating point (s / (s + 0)); the other form misses by an ulp.
    st = shift * t
    return st / (st + (1 - t))


def resolution_shift(num_tokens: int, base_tokens: int) -> float:
    """SD3's resolution-dependent shift factor ``alpha = sqrt(m / n)`` (Esser et al. 2024,
    sec. 5.3.2, eq. 23): ``m`` the token (or pixel) count of the resolution sampled or
    trained, ``n`` that of the base resolution whose schedule it should match. Use it as
    ``shift_time(t, resolution_shift(m, n))``."""
    for name, v in (("num_tokens", num_tokens), ("base_tokens", base_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return math.sqrt(num_tokens / base_tokens)


def dynamic_shift(num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """FLUX's token-count-dependent shift factor ``exp(mu)``, with ``mu`` linear in the
    packed image sequence length: ``base_shift`` at ``base_tokens``, ``max_shift`` at
    ``max_tokens`` (FLUX.1's scheduler defaults). FLUX shifts its sigmas exponentially,
    ``e^mu / (e^mu + (1 / t - 1))``, which is ``shift_time(t, exp(mu))``: use it the same way
    as ``resolution_shift``."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ConfigError(f"num_tokens must be a positive integer, got {num_tokens!r}")
    if max_tokens == base_tokens:
        raise ConfigError("dynamic_shift: max_tokens must differ from base_tokens")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + slope * (num_tokens - base_tokens))


def _shift_derivative(t: Tensor, shift: float) -> Tensor:
    """d/dt of ``shift_time(t, shift)``: ``shift / (1 + (shift - 1) t)^2``."""
    return shift / (1 + (shift - 1) * t) ** 2


def _uniform(n: int, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else None
    return torch.rand(n, generator=generator, dtype=torch.float64, device=device)


class TimeSampler:
    """Base class: draw base times, then apply the shared ``shift_time``.

    Subclasses implement ``_sample(n, generator) -> float64 Tensor[n]`` and
    ``_pdf(t) -> float64`` density of the unshifted variable.
    """

    name = "base"

    def __init__(self, shift: float = 1.0):
        shift_time(0.0, shift)  # validates
        self.shift = float(shift)

    def _sample(self, n: int, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError

    def _pdf(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw ``n`` times in [0, 1] as a float32 tensor ``[n]`` on ``device``.

        Randomness comes from ``generator`` (on its own device) so results repeat
        for a given seed regardless of the target device.
        """
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"number of time samples must be a non-negative int, got n={n!r}")
        t = self._sample(n, generator)
        t = shift_time(t, self.shift).clamp(0.0, 1.0)
        return t.to(device=device if device is not None else t.device, dtype=torch.float32)

    def pdf(self, t: Tensor | float) -> Tensor:
        """Exact density of ``sample``'s output at ``t`` (float64 tensor, shape of ``t``).

        With a shift, by change of variables: ``p(t) = p_base(s^-1(t)) |d s^-1 / dt|``
        where ``s^-1 = shift_time(., 1/shift)``.
        """
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.shift == 1:
            base = t
            jac = torch.ones_like(t)
        else:
            base = shift_time(t, 1.0 / self.shift)
            jac = _shift_derivative(t, 1.0 / self.shift)
        inside = (t >= 0) & (t <= 1)
        dens = self._pdf(base.clamp(0.0, 1.0)) * jac
        return torch.where(inside, dens, torch.zeros_like(dens))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Uniform(TimeSampler):
    """t ~ U[0, 1] (Liu et al. 2022, the original rectified-flow training)."""

    name = "uniform"

    def _sample(self, n, generator):
        return _uniform(n, generator)

    def _pdf(self, t):
        return torch.ones_like(t)


class LogitNormal(TimeSampler):
    """Logit-normal: ``t = sigmoid(m + s n)``, n ~ N(0, 1) (SD3, Esser et al. 2024, eq. 19).

    Density ``p(t) = 1 / (s sqrt(2 pi)) / (t (1 - t)) exp(-(logit(t) - m)^2 / (2 s^2))``.
    ``m > 0`` puts more weight on the noise end (t -> 1) under our convention.
    """

    name = "logit_normal"

    def __init__(self, m: float = 0.0, s: float = 1.0, shift: float = 1.0):
        if not (math.isfinite(s) and s > 0):
            raise ConfigError(f"logit_normal scale must be positive, got s={s!r}")
        if not math.isfinite(m):
            raise ConfigError(f"logit_normal location must be finite, got m={m!r}")
        super().__init__(shift)
        self.m, self.s = float(m), float(s)

    def _sample(self, n, generator):
        device = generator.device if generator is not None else None
        z = torch.randn(n, generator=generator, dtype=torch.float64, device=device)
        return torch.sigmoid(self.m + self.s * z)

    def _pdf(self, t):
        tc = t.clamp(1e-300, 1 - 1e-16)
        logit = torch.log(tc) - torch.log1p(-tc)
        dens = torch.exp(-((logit - self.m) ** 2) / (2 * self.s**2)) / (
            self.s * math.sqrt(2 * math.pi) * tc * (1 - tc)
        )
        # The density tends to 0 at both ends for every (m, s).
        return torch.where((t > 0) & (t < 1), dens, torch.zeros_like(dens))


class ModeSampling(TimeSampler):
    """Mode sampling with heavy tails (SD3, Esser et al. 2024, eq. 20).

    ``t = f(u) = 1 - u - scale (cos^2(pi u / 2) - 1 + u)`` with u ~ U[0, 1]. ``f`` maps
    [0, 1] onto [1, 0]; ``f'(u) = -1 - scale + (scale pi / 2) sin(pi u)`` stays <= 0 (so
    ``f`` is a bijection) exactly when ``-1 <= scale <= 2 / (pi - 2)``. The density is
    ``p(t) = 1 / |f'(f^-1(t))|``, with ``f^-1`` found by bisection. ``scale = 0`` is
    uniform; positive scales concentrate mass around t = 1/2.
    """

    name = "mode"
    MAX_SCALE = 2.0 / (math.pi - 2.0)

    def __init__(self, scale: float = 1.29, shift: float = 1.0):
        if not (math.isfinite(scale) and -1.0 <= scale <= self.MAX_SCALE):
            raise ConfigError(
                f"mode sampling scale must lie in [-1, 2/(pi-2) = {self.MAX_SCALE:.4f}] "
                f"for the map to be monotone, got scale={scale!r}"
            )
        super().__init__(shift)
        self.scale = float(scale)

    def _f(self, u: Tensor) -> Tensor:
        return 1 - u - self.scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)

    def _df(self, u: Tensor) -> Tensor:
        return -1 - self.scale + (self.scale * math.pi / 2) * torch.sin(math.pi * u)

    def _inverse(self, t: Tensor) -> Tensor:
        lo = torch.zeros_like(t)
        hi = torch.ones_like(t)
        # f is decreasing: f(lo) >= t >= f(hi). 60 halvings reach float64 resolution.
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            above = self._f(mid) > t
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def _sample(self, n, generator):
        return self._f(_uniform(n, generator))

    def _pdf(self, t):
        return 1.0 / self._df(self._inverse(t)).abs()


class CosMap(TimeSampler):
    """CosMap (SD3, Esser et al. 2024, eq. 21): ``t = 1 - 1 / (tan(pi u / 2) + 1)``.

    Inverse ``u = (2 / pi) atan(t / (1 - t))`` gives the density
    ``p(t) = 2 / (pi (t^2 + (1 - t)^2))``, largest at both ends.
    """

    name = "cosmap"

    def _sample(self, n, generator):
        u = _uniform(n, generator)
        # Algebraically equal to 1 - 1/(tan + 1) but finite at u = 1 where tan overflows.
        s, c = torch.sin(math.pi * u / 2), torch.cos(math.pi * u / 2)
        return s / (s + c)

    def _pdf(self, t):
        return 2.0 / (math.pi * (t**2 + (1 - t) ** 2))


class UShaped(TimeSampler):
    """U-shaped distribution of 2-rectified flow++ (Lee, Lin & Fanti 2024).

    An exponential density ``a e^{a t} / (e^a - 1)`` on [0, 1] mixed 50/50 with its
    mirror image ``t -> 1 - t``; the mixture simplifies to
    ``p(t) = a cosh(a (t - 1/2)) / (2 sinh(a / 2))``, heaviest at both ends. Its CDF
    ``F(t) = 1/2 + sinh(a (t - 1/2)) / (2 sinh(a / 2))`` inverts in closed form, so one
    uniform per sample suffices.
    """

    name = "u_shaped"

    def __init__(self, a: float = 4.0, shift: float = 1.0):
        if not (math.isfinite(a) and 0 < a <= 600):
            raise ConfigError(f"u_shaped concentration must lie in (0, 600], got a={a!r}")
        super().__init__(shift)
        self.a = float(a)

    def _sample(self, n, generator):
        u = _uniform(n, generator)
        return 0.5 + torch.asinh((2 * u - 1) * math.sinh(self.a / 2)) / self.a

    def _pdf(self, t):
        return self.a * torch.cosh(self.a * (t - 0.5)) / (2 * math.sinh(self.a / 2))


TIME_SAMPLERS: dict[str, type[TimeSampler]] = {
    cls.name: cls for cls in (Uniform, LogitNormal, ModeSampling, CosMap, UShaped)
}

_KEYS: dict[str, tuple[str, ...]] = {
    "uniform": ("shift",),
    "logit_normal": ("m", "s", "shift"),
    "mode": ("scale", "shift"),
    "cosmap": ("shift",),
    "u_shaped": ("a", "shift"),
}


def build_time_sampler(spec: str) -> TimeSampler:
    """Build a sampler from a string such as ``"logit_normal:m=0,s=1"``.

    Grammar: ``name[:key=value[,key=value...]]``. Names: uniform, logit_normal, mode,
    cosmap, u_shaped; every sampler also accepts ``shift``. Unknown names or keys
    raise ``ConfigError`` listing the valid ones.
    """
    if isinstance(spec, TimeSampler):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"time sampler spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in TIME_SAMPLERS:
        raise ConfigError(
            f"unknown time sampler {name!r} in {spec!r}; valid: {', '.join(TIME_SAMPLERS)}"
        )
    kwargs: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"time sampler option {item!r} in {spec!r} is not key=value")
        if key not in _KEYS[name]:
            raise ConfigError(
                f"unknown option {key!r} for time sampler {name!r}; "
                f"valid: {', '.join(_KEYS[name])}"
            )
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise ConfigError(
                f"time sampler option {key}={value!r} in {spec!r} is not a number"
            ) from None
    return TIME_SAMPLERS[name](**kwargs)
