"""Closed-form and reference checks of flowdit.eval: FID, precision/recall, PSNR, SSIM."""

import math

import numpy as np
import pytest
import torch

from flowdit.errors import DataError
from flowdit.eval import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    precision_recall,
    psnr,
    ssim,
)

# ----------------------------------------------------------------------------- FID


def _rng(seed=0):
    return np.random.default_rng(seed)


def _random_rotation(d, seed=0):
    q, r = np.linalg.qr(_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_feature_statistics_matches_numpy_and_accepts_torch():
    x = _rng().normal(size=(40, 5))
    mu, sigma = feature_statistics(torch.from_numpy(x).float())
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (5,) and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), atol=1e-6)


def test_fd_of_a_set_with_itself_is_zero():
    x = _rng().normal(size=(300, 16)) * 3 + 1
    mu, sigma = feature_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-6 * np.trace(sigma)
    assert fid_from_features(x, x) < 1e-6 * np.trace(sigma)


def test_fd_against_a_shifted_copy_is_the_squared_shift():
    x = _rng().normal(size=(300, 16))
    shift = np.linspace(-1.0, 2.0, 16)
    assert fid_from_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_fd_grows_with_noise():
    x = _rng(1).normal(size=(2000, 8))
    noise = _rng(2).normal(size=(2000, 8))
    fds = [fid_from_features(x, x + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_fd_closed_form_for_diagonal_gaussians():
    g = _rng(3)
    m1, m2 = g.normal(size=10), g.normal(size=10)
    s1, s2 = g.uniform(0.1, 4.0, size=10), g.uniform(0.1, 4.0, size=10)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    # The distance is rotation invariant, so a shared rotation hides the diagonal form.
    q = _random_rotation(10)
    got = frechet_distance(q @ m1, q @ np.diag(s1) @ q.T, q @ m2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fd_is_stable_for_singular_covariances():
    # Different singular supports: dims 0-9 vs dims 5-14 of 64, then a shared rotation.
    d = 64
    s1, s2 = np.zeros(d), np.zeros(d)
    s1[:10] = np.linspace(0.5, 3.0, 10)
    s2[5:15] = np.linspace(2.0, 0.2, 10)
    m1, m2 = np.zeros(d), np.full(d, 0.1)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    q = _random_rotation(d, seed=4)
    got = frechet_distance(q @ m1, q @ np.diag(s1) @ q.T, q @ m2, q @ np.diag(s2) @ q.T)
    assert math.isfinite(got) and got >= 0
    assert got == pytest.approx(expected, rel=1e-7)


def test_fd_is_stable_for_rank_deficient_sample_covariance():
    # N = 50 samples in D = 64: the covariance has rank 49.
    x = _rng(5).normal(size=(50, 64))
    shift = np.full(64, 0.25)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)
    got = fid_from_features(x, x + shift)
    assert math.isfinite(got) and got == pytest.approx(float(shift @ shift), rel=1e-9)
    y = _rng(6).normal(size=(50, 64)) * 2
    other = fid_from_features(x, y)
    assert math.isfinite(other) and other > 0


def test_fd_agrees_with_scipy_sqrtm_on_a_well_conditioned_case():
    linalg = pytest.importorskip("scipy.linalg")
    g = _rng(7)
    a = g.normal(size=(500, 8)) @ g.normal(size=(8, 8))
    b = g.normal(size=(400, 8)) @ g.normal(size=(8, 8)) + 0.5
    m1, s1 = feature_statistics(a)
    m2, s2 = feature_statistics(b)
    root = linalg.sqrtm(s1 @ s2).real
    reference = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-8)


@pytest.mark.parametrize(
    "args",
    [
        (np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)),
        (np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)),
        (np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)),
        (np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2)),
        (np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2)),
    ],
)
def test_fd_rejects_bad_input(args):
    with pytest.raises(DataError):
        frechet_distance(*args)


def test_feature_statistics_rejects_bad_input():
    with pytest.raises(DataError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(DataError, match=r"\[N, D\]"):
        feature_statistics(np.zeros(4))
    with pytest.raises(DataError, match="same dimension"):
        fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))


# -------------------------------------------------------------- precision / recall


def _blobs(centres, n_per, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + torch.randn(n_per, c.shape[0], generator=g) for c in centres])


def test_precision_recall_of_a_set_with_itself_is_one():
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x, k=3) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_of_disjoint_sets_is_zero():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(300, 8, generator=g)
    fake = torch.randn(300, 8, generator=g) + 100.0
    pr = precision_recall(real, fake.numpy())
    assert pr["precision"] < 0.01 and pr["recall"] < 0.01


def test_precision_recall_when_fake_covers_half_the_modes():
    centres = 20.0 * torch.eye(4)
    real = _blobs(centres, 250, seed=2)
    fake = _blobs(centres[:2], 250, seed=3)
    pr = precision_recall(real, fake, k=3)
    assert pr["precision"] > 0.85
    assert 0.4 < pr["recall"] <= 0.5


def test_precision_recall_does_not_depend_on_batch_size():
    g = torch.Generator().manual_seed(4)
    real, fake = torch.randn(120, 6, generator=g), torch.randn(90, 6, generator=g) + 0.5
    assert precision_recall(real, fake, batch_size=7) == precision_recall(real, fake)


def test_precision_recall_rejects_bad_input():
    with pytest.raises(DataError, match="feature dimension"):
        precision_recall(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(DataError, match="samples"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)
    with pytest.raises(DataError, match=r"\[N, D\]"):
        precision_recall(torch.zeros(10), torch.zeros(10, 4))


# ------------------------------------------------------------------- PSNR / SSIM


def _images(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


def test_psnr_identical_is_inf_and_known_mse_gives_known_value():
    x = _images((3, 1, 8, 8))
    assert torch.isinf(psnr(x, x)).all()
    y = torch.zeros(2, 3, 8, 8)
    # MSE 0.01 in a range of 2: 10 log10(4 / 0.01) = 10 log10(400).
    got = psnr(y, y + 0.1)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.full((2,), 10 * math.log10(400.0)))
    torch.testing.assert_close(psnr(y, y + 0.1, data_range=1.0),
                               torch.full((2,), 10 * math.log10(100.0)))


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (2, 3, 28, 28)])
def test_ssim_identical_is_one_and_decreases_with_noise(shape):
    x = _images(shape)
    torch.testing.assert_close(ssim(x, x), torch.ones(shape[0]))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    scores = [ssim(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.2, 0.5, 1.0)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (2, 3, 28, 28)])
def test_ssim_is_symmetric_and_bounded(shape):
    x, y = _images(shape, 2), _images(shape, 3)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    for a, b in ((x, y), (x, -x), (x, x * 0.5)):
        s = ssim(a, b)
        assert s.shape == (shape[0],)
        assert ((s >= -1) & (s <= 1)).all()
    # A checkerboard of +-0.5 against its negative: the Gaussian window averages the local
    # means to ~0, so the luminance term is ~1 and SSIM is the contrast-structure term
    # (C2 - 2 var) / (C2 + 2 var) with var = 0.25, close to -1. (For x vs -x with nonzero
    # local means both terms turn negative and SSIM can be positive.)
    ii, jj = torch.meshgrid(torch.arange(shape[2]), torch.arange(shape[3]), indexing="ij")
    checker = (0.5 * (-1.0) ** (ii + jj)).expand(shape)
    c2 = (0.03 * 2) ** 2
    expected = torch.full((shape[0],), (c2 - 0.5) / (c2 + 0.5))
    torch.testing.assert_close(ssim(checker, -checker), expected, atol=1e-4, rtol=0)


def test_ssim_matches_a_scipy_reference():
    # Independent reference: scipy's Gaussian filter (radius 5 = 11 taps for sigma 1.5)
    # with the border cropped, i.e. a valid convolution, as in Wang et al.'s code.
    ndimage = pytest.importorskip("scipy.ndimage")
    x, y = _images((2, 3, 28, 28), 4).double(), _images((2, 3, 28, 28), 5).double()
    x = 0.7 * x + 0.3 * y

    def reference(a, b):
        def blur(img):
            out = ndimage.gaussian_filter(img, sigma=1.5, truncate=3.5, mode="reflect")
            return out[5:-5, 5:-5]

        c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
        mu_a, mu_b = blur(a), blur(b)
        va, vb = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
        cov = blur(a * b) - mu_a * mu_b
        smap = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
        return smap.mean()

    expected = [np.mean([reference(x[i, c].numpy(), y[i, c].numpy()) for c in range(3)])
                for i in range(2)]
    torch.testing.assert_close(ssim(x, y), torch.tensor(expected, dtype=torch.float64))


def test_pixel_metrics_reject_bad_input():
    with pytest.raises(DataError, match="shape"):
        psnr(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 7))
    with pytest.raises(DataError, match="shape"):
        ssim(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))
    with pytest.raises(DataError, match="window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), window=4)
