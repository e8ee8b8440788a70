"""Full-reference pixel metrics between image batches: PSNR and SSIM.

Images follow the library convention ``[B, C, H, W]`` in ``[-1, 1]``, so the default
data range (max - min of the valid pixel values) is 2. Both metrics return one value per
image, ``[B]``; average them yourself if you want a single number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flowdit.errors import DataError

__all__ = ["psnr", "ssim"]


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise DataError(
            f"x and y must be torch tensors; got {type(x).__name__} and {type(y).__name__}"
        )
    if x.dim() != 4 or x.shape != y.shape:
        raise DataError(
            f"x and y must both have shape [B, C, H, W] and match; got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    # Squared errors of [-1, 1] images underflow/round badly in half precision.
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype), y.to(dtype)


def _check_range(data_range: float) -> None:
    if not data_range > 0:
        raise DataError(f"data_range must be > 0; got {data_range}")


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    ``PSNR = 10 log10(data_range^2 / MSE)`` with the MSE taken over ``C, H, W``.

    Args:
        x, y: images ``[B, C, H, W]``, by default in ``[-1, 1]``.
        data_range: max - min of the pixel range; 2 for ``[-1, 1]``, 1 for ``[0, 1]``.

    Returns:
        ``[B]`` tensor; ``inf`` where the two images are identical.
    """
    x, y = _check_pair(x, y)
    _check_range(data_range)
    mse = (x - y).pow(2).flatten(1).mean(dim=1)
    # Dividing by an MSE of exactly 0 gives +inf, the conventional PSNR of equal images.
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_kernel(size: int, sigma: float, dtype: torch.dtype, device) -> Tensor:
    """Normalised 1-D Gaussian of odd length ``size`` -> ``[size]``."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-offsets.pow(2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> Tensor:
    """Structural similarity index per image (Wang et al. 2004, "Image quality
    assessment: from error visibility to structural similarity", eq. 13 with the
    Gaussian-weighted local statistics of eq. 14-16).

    For each channel, local means, variances and the covariance are taken under an
    isotropic Gaussian window (``window`` taps, std ``sigma``), and

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

    with ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` and ``L = data_range``. The map is
    averaged over positions and then over channels.

    The convolution is *valid* (no padding), as in the reference MATLAB code of Wang et
    al.: only positions where the whole window lies inside the image are scored, so no
    padded pixels bias the statistics at the border. Small images (e.g. 8x8) get a
    window shrunk to the largest odd size that fits, with the same ``sigma``.

    Args:
        x, y: images ``[B, C, H, W]``, by default in ``[-1, 1]``.
        data_range: max - min of the pixel range; 2 for ``[-1, 1]``.
        window: odd window size, 11 in the paper (7 is also common).
        sigma: standard deviation of the Gaussian window, 1.5 in the paper.

    Returns:
        ``[B]`` tensor in ``[-1, 1]``; exactly 1 for identical images.
    """
    x, y = _check_pair(x, y)
    _check_range(data_range)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise DataError(f"window must be an odd integer >= 1; got {window!r}")
    if not sigma > 0:
        raise DataError(f"sigma must be > 0; got {sigma}")
    b, c, h, w = x.shape
    if min(h, w) < 1:
        raise DataError(f"images must have H, W >= 1; got shape {tuple(x.shape)}")
    fit = min(h, w) if min(h, w) % 2 == 1 else min(h, w) - 1
    size = min(window, fit)

    # One grouped, separable convolution filters the five moment maps of every channel.
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    g = _gaussian_kernel(size, sigma, x.dtype, x.device)
    groups = stacked.shape[1]
    filtered = F.conv2d(stacked, g.view(1, 1, size, 1).expand(groups, 1, size, 1), groups=groups)
    filtered = F.conv2d(filtered, g.view(1, 1, 1, size).expand(groups, 1, 1, size), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = filtered.split(c, dim=1)

    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    # Every channel's map has the same size, so the mean over (C, H', W') is the mean of
    # the per-channel means.
    return ssim_map.flatten(1).mean(dim=1)
