"""Known linear degradations ``y = A x (+ noise)`` for inverse problems.

Every operator maps images ``[B, C, H, W]`` to measurements and has an exact adjoint
``A^T`` (tested with ``<A x, y> = <x, A^T y>``), so a data-fidelity gradient
``A^T (A x - y)`` needs no autograd. ``norm_sq`` is ``||A||^2`` (largest eigenvalue of
``A^T A``), used to scale gradient steps; ``pinv`` (where cheap and exact) is the
Moore-Penrose pseudo-inverse, used by the replacement baseline.

Tasks (``build_operator``): ``inpaint`` (a centred box of missing pixels),
``inpaint_random`` (each pixel missing with probability ``p``), ``sr2`` / ``sr4``
(average pooling by 2 / 4), ``deblur`` (Gaussian blur, zero padding).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flowdit.errors import ConfigError

__all__ = [
    "LinearOperator",
    "Inpaint",
    "SuperResolution",
    "GaussianBlur",
    "TASKS",
    "box_mask",
    "random_mask",
    "build_operator",
    "measure",
]

TASKS = ("inpaint", "inpaint_random", "sr2", "sr4", "deblur")


def _check_images(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ConfigError(f"{what}: expected a float tensor [B, C, H, W], got {shape}")


class LinearOperator:
    """A linear map ``A`` from images ``[B, C, H, W]`` to measurements.

    Subclasses implement ``forward`` (``A x``) and ``adjoint`` (``A^T y``); ``pinv`` is
    optional (``None`` when the operator has no cheap exact pseudo-inverse).
    """

    name = "operator"
    norm_sq: float = 1.0

    def forward(self, x: Tensor) -> Tensor:
        """``A x``: images ``[B, C, H, W]`` to measurements."""
        raise NotImplementedError

    def adjoint(self, y: Tensor) -> Tensor:
        """``A^T y``: measurements back to image shape ``[B, C, H, W]``."""
        raise NotImplementedError

    pinv = None

    def __call__(self, x: Tensor) -> Tensor:
        _check_images(x, self.name)
        return self.forward(x)

    def residual_grad(self, x: Tensor, y: Tensor) -> Tensor:
        """Gradient of ``1/2 ||A x - y||^2`` with respect to ``x``: ``A^T (A x - y)``, shaped like ``x``."""
        return self.adjoint(self.forward(x) - y)


class Inpaint(LinearOperator):
    """``A x = m * x`` with a 0/1 mask ``m [1 or B, 1 or C, H, W]`` (1 = observed pixel).

    Self-adjoint and idempotent, so ``A^T = A^+ = A`` and ``||A||^2 = 1``; the missing
    pixels of ``y`` are zero.
    """

    name = "inpaint"
    norm_sq = 1.0

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor) or mask.dim() != 4:
            raise ConfigError(f"inpainting mask must be a tensor [B, C, H, W], got {getattr(mask, 'shape', mask)}")
        self.mask = (mask > 0.5).float()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x)

    adjoint = forward
    pinv = forward


class SuperResolution(LinearOperator):
    """Average pooling by ``factor``: ``[B, C, H, W] -> [B, C, H/f, W/f]``.

    The adjoint spreads each low-resolution value evenly over its ``f x f`` block
    (nearest upsampling divided by ``f^2``); since ``A A^T = I / f^2``, the pseudo-inverse
    is plain nearest upsampling and ``||A||^2 = 1 / f^2``.
    """

    def __init__(self, factor: int):
        if int(factor) != factor or factor < 1:
            raise ConfigError(f"super-resolution factor must be a positive integer, got {factor!r}")
        self.factor = int(factor)
        self.name = f"sr{self.factor}"
        self.norm_sq = 1.0 / self.factor**2

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ConfigError(f"{self.name}: image size {tuple(x.shape[-2:])} is not divisible by {self.factor}")
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y: Tensor) -> Tensor:
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")

    def adjoint(self, y: Tensor) -> Tensor:
        return self.pinv(y) / self.factor**2


class GaussianBlur(LinearOperator):
    """Depthwise convolution with a normalised Gaussian ``kernel_size x kernel_size``,
    zero padding (so the operator is exactly linear and, the kernel being symmetric,
    self-adjoint); ``||A||^2 <= 1`` (the kernel sums to 1), used as the step scale."""

    name = "deblur"
    norm_sq = 1.0

    def __init__(self, kernel_size: int = 5, sigma: float = 1.0):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"blur kernel_size must be a positive odd integer, got {kernel_size}")
        if not sigma > 0:
            raise ConfigError(f"blur sigma must be > 0, got {sigma}")
        r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
        g = torch.exp(-(r**2) / (2 * sigma**2))
        g = g / g.sum()
        self.kernel = torch.outer(g, g).float()
        self.kernel_size, self.sigma = kernel_size, sigma

    def forward(self, x: Tensor) -> Tensor:
        C = x.shape[1]
        w = self.kernel.to(x).expand(C, 1, self.kernel_size, self.kernel_size)
        return F.conv2d(x, w, padding=self.kernel_size // 2, groups=C)

    adjoint = forward


def box_mask(shape: tuple[int, int, int], box: float = 0.5) -> Tensor:
    """Mask ``[1, C, H, W]``: a centred square of side ``round(box * H)`` missing (0), the rest observed (1)."""
    C, H, W = shape
    if not 0 < box < 1:
        raise ConfigError(f"inpainting box fraction must be in (0, 1), got {box}")
    side_h, side_w = max(1, round(box * H)), max(1, round(box * W))
    m = torch.ones(1, C, H, W)
    top, left = (H - side_h) // 2, (W - side_w) // 2
    m[..., top:top + side_h, left:left + side_w] = 0
    return m


def random_mask(shape: tuple[int, int, int], batch: int, p: float = 0.7, seed: int = 0) -> Tensor:
    """Mask ``[batch, 1, H, W]`` (broadcast over channels): each pixel missing with probability ``p``."""
    _, H, W = shape
    if not 0 <= p < 1:
        raise ConfigError(f"random inpainting drop probability must be in [0, 1), got {p}")
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 1, H, W, generator=g) >= p).float()


def build_operator(task: str, shape: tuple[int, int, int], batch: int = 1, *, box: float = 0.5,
                   p: float = 0.7, blur_kernel: Optional[int] = None, blur_sigma: Optional[float] = None,
                   seed: int = 0) -> LinearOperator:
    """The operator of a named restoration task for images of ``shape = (C, H, W)``.

    ``batch`` and ``seed`` set the per-image masks of ``inpaint_random``; the blur kernel
    defaults to ``~H/4`` wide (odd) with ``sigma = H / 14`` (2 px on 28 px MNIST).
    """
    task = str(task).strip().lower()
    if task == "inpaint":
        return Inpaint(box_mask(shape, box))
    if task == "inpaint_random":
        return Inpaint(random_mask(shape, batch, p, seed))
    if task in ("sr2", "sr4"):
        f = int(task[2:])
        if shape[1] % f or shape[2] % f:
            raise ConfigError(f"task {task}: image size {shape[1]}x{shape[2]} is not divisible by {f}")
        return SuperResolution(f)
    if task == "deblur":
        H = shape[1]
        k = blur_kernel or (max(3, H // 4) | 1)
        return GaussianBlur(k, blur_sigma or max(0.5, H / 14))
    raise ConfigError(f"unknown restoration task {task!r}; valid: {', '.join(TASKS)}")


def measure(op: LinearOperator, x: Tensor, noise_std: float = 0.0, seed: int = 0) -> Tensor:
    """Measurement ``y = A x + noise_std * n``, ``n ~ N(0, I)`` drawn from ``seed`` (masked
    pixels of an inpainting measurement stay exactly zero)."""
    if noise_std < 0 or not math.isfinite(noise_std):
        raise ConfigError(f"measurement noise std must be a finite number >= 0, got {noise_std}")
    y = op(x)
    if noise_std > 0:
        n = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
        y = y + noise_std * (op.forward(n) if isinstance(op, Inpaint) else n)
    return y
