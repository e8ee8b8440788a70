"""MNIST from the standard IDX files, parsed here (no torchvision, no download).

IDX layout: a big-endian uint32 magic (0x0000 then a type byte, 0x08 = uint8, then
the number of dimensions), one big-endian uint32 per dimension, then the payload.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from flowdit.data.base import ImageDataset
from flowdit.errors import DataError

__all__ = ["load_mnist", "read_idx", "MNIST_FILES", "IMAGES_MAGIC", "LABELS_MAGIC"]

IMAGES_MAGIC = 2051  # uint8, 3 dimensions: count, rows, cols
LABELS_MAGIC = 2049  # uint8, 1 dimension: count

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one uint8 IDX file (gzip-compressed if its name ends in ``.gz``).

    Args:
        path: the file.
        magic: the magic number expected in its header (2051 images, 2049 labels).

    Returns:
        a writable uint8 array whose shape is the header's dimensions,
        e.g. ``[60000, 28, 28]`` for the training images.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: file is {len(raw)} bytes, too short for an IDX magic number")
    (found,) = struct.unpack_from(">I", raw, 0)
    if found != magic:
        raise DataError(f"{path}: IDX magic number is {found}, expected {magic}")
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{path}: truncated: file is {len(raw)} bytes, shorter than its "
            f"{header_size}-byte IDX header"
        )
    dims = struct.unpack_from(f">{ndim}I", raw, 4)
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(raw) - header_size
    if payload != expected:
        what = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: header says {' x '.join(map(str, dims))} = {expected} bytes "
            f"of data, file holds {payload}"
        )
    # frombuffer on a bytearray gives a writable view, so torch can share it without a copy.
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims)


def load_mnist(root: str | Path, split: str = "train") -> ImageDataset:
    """Load MNIST (or any data set in the same IDX layout) from a directory.

    Looks for ``train-images-idx3-ubyte.gz`` / ``train-labels-idx1-ubyte.gz`` (split
    ``"train"``) or ``t10k-images-idx3-ubyte.gz`` / ``t10k-labels-idx1-ubyte.gz``
    (split ``"test"``), or the same names without ``.gz``; the ``.gz`` wins if both exist.

    Returns:
        images uint8 ``[N, 1, 28, 28]``, labels int64 ``[N]`` in 0..9;
        N is 60,000 for train and 10,000 for test.
    """
    if split not in MNIST_FILES:
        raise DataError(f"mnist: split must be one of {', '.join(MNIST_FILES)}; got {split!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"mnist: directory {root} does not exist; it should hold "
            f"{', '.join(n + '.gz' for pair in MNIST_FILES.values() for n in pair)}"
        )
    image_name, label_name = MNIST_FILES[split]
    images_path = _find(root, image_name)
    labels_path = _find(root, label_name)

    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path}: holds {labels.shape[0]} labels but {images_path.name} "
            f"holds {images.shape[0]} images"
        )
    if labels.size and labels.max() > 9:
        bad = int(np.flatnonzero(labels > 9)[0])
        raise DataError(
            f"{labels_path}: labels must lie in 0..9, label {bad} is {int(labels[bad])}"
        )
    return ImageDataset(
        images=torch.from_numpy(images).unsqueeze(1),
        labels=torch.from_numpy(labels).to(torch.int64),
        num_classes=10,
        class_names=[str(i) for i in range(10)],
        name="mnist",
        split=split,
    )


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    expected = [n for pair in MNIST_FILES.values() for n in pair]
    raise DataError(
        f"mnist: {stem}.gz (or {stem}) not found in {root}; the directory should hold "
        f"{', '.join(n + '.gz' for n in expected)} (or the same names without .gz)"
    )


def _read_bytes(path: Path) -> bytearray:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return bytearray(f.read())
        return bytearray(path.read_bytes())
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from e
