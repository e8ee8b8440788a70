"""Frechet distance between two sets of features (FID when the features are Inception
activations; Heusel et al. 2017, "GANs trained by a two time-scale update rule converge
to a local Nash equilibrium", eq. 6).

Each set is summarised by a Gaussian ``N(mu, Sigma)`` fitted to it, and the distance is
the squared 2-Wasserstein distance between the two Gaussians::

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

How the trace of the square root is computed
--------------------------------------------
The usual reference code calls ``scipy.linalg.sqrtm(S1 @ S2)``. ``S1 S2`` is not
symmetric, so ``sqrtm`` goes through a complex Schur form; when a covariance is
singular (fewer samples than feature dimensions, which is common) it returns complex
values, NaNs, or a visibly wrong trace, and has to be patched with a diagonal offset.

Here we use the fact that ``S1 S2`` is similar to the symmetric positive semi-definite
matrix ``M = S1^{1/2} S2 S1^{1/2}``, so ``Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(M))``.
Everything is done with symmetric eigendecompositions (``numpy.linalg.eigh``) in float64:
``S1 = V diag(w) V^T`` gives ``M ~ diag(sqrt w) (V^T S2 V) diag(sqrt w)``, whose
eigenvalues are real. Rounding still makes the zero eigenvalues of a singular matrix come
out as tiny numbers of either sign; eigenvalues of ``M`` below the float64 rounding floor
(``D * machine epsilon * largest eigenvalue``) are set to 0 before taking square roots,
since ``sqrt`` would turn 1e-15 of noise into 3e-8 of error per null direction, and
negative eigenvalues of the covariances are clamped to 0. No offset is added to the
covariances, so the result is unbiased for singular ones too.
"""

from __future__ import annotations

import numpy as np
import torch

from flowdit.errors import DataError

__all__ = ["feature_statistics", "frechet_distance", "fid_from_features"]


def _as_float64_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{name} must be a numeric array; got {type(x).__name__}") from err
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} of shape {arr.shape} contains NaN or infinite values")
    return arr


def _input_epsilon(x) -> float:
    """Machine epsilon of the caller's dtype, before it was converted to float64."""
    dtype = x.dtype if isinstance(x, (torch.Tensor, np.ndarray)) else None
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return float(torch.finfo(dtype).eps)
    if isinstance(dtype, np.dtype) and np.issubdtype(dtype, np.floating):
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a set of feature vectors.

    These are the Gaussian parameters that FID compares (Heusel et al. 2017, sec. 3).

    Args:
        features: ``[N, D]`` torch tensor or numpy array, one feature vector per row,
            with ``N >= 2``.

    Returns:
        ``(mu, sigma)``: float64 numpy arrays of shape ``[D]`` and ``[D, D]``;
        ``sigma`` divides by ``N - 1``.
    """
    x = _as_float64_numpy(features, "features")
    if x.ndim != 2:
        raise DataError(f"features must have shape [N, D]; got shape {x.shape}")
    n = x.shape[0]
    if n < 2:
        raise DataError(
            f"features of shape {x.shape} has N = {n} rows; a covariance needs N >= 2"
        )
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (n - 1)
    # X^T X is symmetric in exact arithmetic; make it so in floating point too.
    sigma = 0.5 * (sigma + sigma.T)
    return mu, sigma


def _psd_eigh(sigma: np.ndarray, name: str, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of a covariance with rounding-level negative eigenvalues set to 0.

    A negative eigenvalue larger than ``tol`` (relative to the largest magnitude) cannot
    come from rounding, so the matrix is not a covariance and we refuse it.
    """
    w, v = np.linalg.eigh(0.5 * (sigma + sigma.T))
    scale = float(np.max(np.abs(w))) if w.size else 0.0
    if w.size and w[0] < -tol * scale:
        raise DataError(
            f"{name} of shape {sigma.shape} is not positive semi-definite: smallest "
            f"eigenvalue {w[0]:.3g} against largest magnitude {scale:.3g} "
            f"(relative tolerance {tol:.3g})"
        )
    return np.clip(w, 0.0, None), v


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    Computes ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Heusel et al. 2017,
    eq. 6; Dowson and Landau 1982). The trace of the square root is taken as
    ``sum sqrt(eig(S1^{1/2} S2 S1^{1/2}))`` with symmetric eigendecompositions, which
    stays real and accurate for singular covariances (see the module docstring).

    Args:
        mu1, mu2: means of shape ``[D]`` (torch or numpy).
        sigma1, sigma2: covariances of shape ``[D, D]``, symmetric positive
            semi-definite up to rounding.
        eps: relative tolerance for rounding in the covariances. Negative eigenvalues
            down to ``-tol * max|eigenvalue|`` are treated as 0, where ``tol`` is the
            larger of ``eps`` and a bound on the rounding error of the caller's dtype
            (so float32 covariances are accepted); anything more negative raises
            ``DataError``.

    Returns:
        The distance as a Python float, ``>= 0`` (tiny negative rounding is clamped).
    """
    if not eps >= 0:
        raise DataError(f"eps must be >= 0; got {eps}")
    m1, m2 = _as_float64_numpy(mu1, "mu1"), _as_float64_numpy(mu2, "mu2")
    s1, s2 = _as_float64_numpy(sigma1, "sigma1"), _as_float64_numpy(sigma2, "sigma2")
    if m1.ndim != 1 or m2.ndim != 1 or m1.shape != m2.shape:
        raise DataError(
            f"mu1 and mu2 must both have shape [D]; got {m1.shape} and {m2.shape}"
        )
    d = m1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise DataError(
            f"sigma1 and sigma2 must have shape [D, D] = [{d}, {d}] to match the means; "
            f"got {s1.shape} and {s2.shape}"
        )

    def tolerance(x) -> float:
        # Rounding in a [D, D] Gram matrix grows roughly like D * machine epsilon.
        return max(eps, 10.0 * d * _input_epsilon(x))

    w1, v1 = _psd_eigh(s1, "sigma1", tolerance(sigma1))
    w2, _ = _psd_eigh(s2, "sigma2", tolerance(sigma2))

    # In the eigenbasis of S1, S1^{1/2} is diagonal, so M costs one similarity transform.
    root_w1 = np.sqrt(w1)
    s2_in_basis1 = v1.T @ s2 @ v1
    m = root_w1[:, None] * s2_in_basis1 * root_w1[None, :]
    m_eigs = np.linalg.eigvalsh(0.5 * (m + m.T))
    # Null directions of M come out as +-(D * machine eps * largest) noise, and sqrt
    # magnifies that noise (1e-15 -> 3e-8 per direction); eigenvalues at or below the
    # rounding floor are indistinguishable from 0, so they count as 0.
    floor = d * np.finfo(np.float64).eps * float(np.max(np.abs(m_eigs), initial=0.0))
    m_eigs = np.where(m_eigs > floor, m_eigs, 0.0)
    trace_sqrt = float(np.sum(np.sqrt(m_eigs)))

    diff = m1 - m2
    # Traces from the clamped eigenvalues, so they match the matrices used for M.
    dist = float(diff @ diff + w1.sum() + w2.sum() - 2.0 * trace_sqrt)
    return max(dist, 0.0)


def fid_from_features(feats_a, feats_b) -> float:
    """Frechet distance between two feature sets ``[N, D]`` and ``[M, D]``.

    Fits a Gaussian to each set with :func:`feature_statistics` and compares them with
    :func:`frechet_distance` (Heusel et al. 2017, eq. 6). With Inception-v3 pool
    features this is FID; with any other embedding it is the same statistic in that
    feature space.
    """
    a = feature_statistics(feats_a)
    b = feature_statistics(feats_b)
    if a[0].shape != b[0].shape:
        raise DataError(
            f"feature sets must have the same dimension D; got D = {a[0].shape[0]} for "
            f"feats_a and D = {b[0].shape[0]} for feats_b"
        )
    return frechet_distance(a[0], a[1], b[0], b[1])
