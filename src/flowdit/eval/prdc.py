"""Improved precision and recall of generated samples in a feature space
(Kynkaanniemi et al. 2019, "Improved precision and recall metric for assessing
generative models", sec. 2, eq. 1-3).

Each set approximates its manifold by the union of hyperspheres centred on its points,
the radius of each being the distance to that point's k-th nearest neighbour in the same
set. Precision is the fraction of generated samples that fall inside the real manifold
(fidelity); recall is the fraction of real samples that fall inside the generated one
(coverage of the modes).

Distances are computed with ``torch.cdist`` one block of query rows at a time, so memory
is ``O(batch_size * N)`` rather than ``O(N * M)``: 10k x 10k sets work in a few tens of MB.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from flowdit.errors import DataError

__all__ = ["precision_recall"]


def _as_features(x, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise DataError(f"{name} must be a torch tensor or numpy array; got {type(x).__name__}")
    if x.dim() != 2:
        raise DataError(f"{name} must have shape [N, D]; got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        # Half precision loses too much in ||a||^2 + ||b||^2 - 2 a.b; integers can't cdist.
        x = x.float()
    if not torch.isfinite(x).all():
        raise DataError(f"{name} of shape {tuple(x.shape)} contains NaN or infinite values")
    return x.detach()


def _knn_radii(x: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each row of ``x [N, D]`` to its k-th nearest other row -> ``[N]``.

    Each point is its own nearest neighbour at distance 0, so we take the (k+1)-th
    smallest distance, which excludes it (and equals the k-th neighbour when points
    repeat, as it should).
    """
    radii = []
    for start in range(0, x.shape[0], batch_size):
        d = torch.cdist(x[start:start + batch_size], x)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _fraction_covered(queries: Tensor, centres: Tensor, radii: Tensor, batch_size: int) -> float:
    """Fraction of ``queries [M, D]`` inside at least one ball ``(centres [N, D], radii [N])``."""
    inside = 0
    for start in range(0, queries.shape[0], batch_size):
        d = torch.cdist(queries[start:start + batch_size], centres)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-3).

    ``precision = mean_{y in fake} f(y, real)`` and ``recall = mean_{x in real} f(x, fake)``
    with ``f(q, S) = 1`` iff ``||q - s|| <= ||s - NN_k(s, S)||`` for some ``s`` in ``S``,
    where ``NN_k(s, S)`` is the k-th nearest neighbour of ``s`` in ``S`` other than ``s``.

    Args:
        real: ``[N, D]`` real features (torch or numpy), ``N > k``.
        fake: ``[M, D]`` generated features, ``M > k``, same ``D``.
        k: neighbourhood size; the paper uses 3.
        batch_size: query rows per ``cdist`` block; peak memory is about
            ``batch_size * max(N, M)`` distances.

    Returns:
        ``{"precision": float, "recall": float}``, each in ``[0, 1]``.

    Float32 inputs are computed in float32 (float64 inputs stay float64); both sets are
    shifted by the real mean first, which leaves distances unchanged but keeps the
    matrix-product form of ``cdist`` from cancelling away small distances between
    points far from the origin.
    """
    real = _as_features(real, "real")
    fake = _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise DataError(
            f"real and fake must have the same feature dimension D; got shapes "
            f"{tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"k must be an integer >= 1; got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    for name, x in (("real", real), ("fake", fake)):
        if x.shape[0] <= k:
            raise DataError(
                f"{name} of shape {tuple(x.shape)} has {x.shape[0]} samples; the k = {k} "
                f"nearest-neighbour radii need more than k"
            )

    dtype = torch.promote_types(real.dtype, fake.dtype)
    centre = real.to(dtype).mean(dim=0, keepdim=True)
    real = real.to(dtype) - centre
    fake = fake.to(device=real.device, dtype=dtype) - centre

    real_radii = _knn_radii(real, k, batch_size)
    fake_radii = _knn_radii(fake, k, batch_size)
    return {
        "precision": _fraction_covered(fake, real, real_radii, batch_size),
        "recall": _fraction_covered(real, fake, fake_radii, batch_size),
    }
