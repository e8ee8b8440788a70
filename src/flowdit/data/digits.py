"""scikit-learn's handwritten digits: 1,797 images of 8x8, 10 classes, no download."""

from __future__ import annotations

import numpy as np
import torch

from flowdit.data.base import ImageDataset
from flowdit.errors import DataError

__all__ = ["load_digits", "digits_split_indices"]

SPLITS = ("train", "test", "all")


def digits_split_indices(
    labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into disjoint train and test sets, stratified by class.

    Within each class the indices are permuted with ``seed`` and the first
    ``round(test_fraction * n_class)`` go to test, so every class keeps the same
    share in both splits and the split never depends on anything but the seed.

    Args:
        labels: int array ``[N]``.

    Returns:
        (train, test): sorted int64 index arrays; together they cover ``0..N-1`` once.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(
            f"digits: test_fraction must lie strictly between 0 and 1, got {test_fraction}"
        )
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """Load scikit-learn's digits as an :class:`ImageDataset` of 8x8 grayscale images.

    Pixel values 0..16 are scaled to uint8 0..255 (``round(x * 255 / 16)``).

    Args:
        split: ``"train"``, ``"test"`` (disjoint, stratified, fixed by ``seed``) or ``"all"``.
        test_fraction: share of each class that goes to the test split.
        seed: seed of the split; keep the default so evaluators see the same test set.

    Returns:
        images uint8 ``[N, 1, 8, 8]``, labels int64 ``[N]``; N is 1,797 for ``"all"``
        and about 80% / 20% of it for train / test.
    """
    if split not in SPLITS:
        raise DataError(f"digits: split must be one of {', '.join(SPLITS)}; got {split!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    if split != "all":
        train, test = digits_split_indices(labels, test_fraction, seed)
        keep = train if split == "train" else test
        pixels, labels = pixels[keep], labels[keep]
    images = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(1)
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        name="digits",
        split=split,
    )
