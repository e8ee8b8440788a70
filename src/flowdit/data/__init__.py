"""Data sets: all held in memory as uint8 and served as float batches in [-1, 1]."""

from __future__ import annotations

import os
from pathlib import Path

from flowdit.data.base import ImageDataset, to_float, to_uint8
from flowdit.data.digits import load_digits
from flowdit.data.folder import load_image_folder
from flowdit.data.mnist import load_mnist
from flowdit.errors import DataError

__all__ = [
    "ImageDataset",
    "to_float",
    "to_uint8",
    "load_digits",
    "load_mnist",
    "load_image_folder",
    "build_dataset",
    "DATASET_NAMES",
    "MNIST_ENV",
]

DATASET_NAMES = ("digits", "mnist", "folder", "shapes")
MNIST_ENV = "FLOWDIT_MNIST"


def build_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Build a data set by name: ``"digits"``, ``"mnist"``, ``"folder"`` or ``"shapes"``.

    Args:
        name: which loader.
        root: directory of the files; unused for digits; for mnist it defaults to the
            ``FLOWDIT_MNIST`` environment variable; required for folder.
        split: ``"train"`` / ``"test"`` (digits also ``"all"``, shapes also ``"val"`` and
            ``"heldout"``). For a folder, ``root/<split>`` is used when that subfolder
            exists, else ``root`` itself for ``"train"``.
        image_size: required for folder (the resize target); for digits and mnist it may
            only restate the native size (8, 28); for shapes the side of the rendered
            scenes (default 64).
        channels: 1 or 3 for folder (default 3); for digits and mnist it may only be 1,
            for shapes only 3.

    Returns:
        the :class:`ImageDataset` (uint8 images ``[N, C, H, W]``, int64 labels ``[N]``);
        for shapes a :class:`flowdit.data.shapes.ShapesDataset`, which also keeps every
        scene's graph, captions and masks (``flowdit.data.shapes.load_shapes``).
    """
    if name == "digits":
        dataset = load_digits(split)
    elif name == "mnist":
        if root is None:
            root = os.environ.get(MNIST_ENV)
        if not root:
            raise DataError(
                f"mnist needs the directory holding its IDX files: pass data.root=... "
                f"or set the {MNIST_ENV} environment variable"
            )
        dataset = load_mnist(root, split)
    elif name == "folder":
        if root is None:
            raise DataError("folder data set needs its directory: pass data.root=...")
        if image_size is None:
            raise DataError("folder data set needs an image size: pass data.image_size=...")
        folder = Path(root).expanduser()
        if (folder / split).is_dir():
            folder = folder / split
        elif split != "train":
            raise DataError(
                f"folder data set: split {split!r} asked for but {folder} has no "
                f"{split!r} subfolder"
            )
        dataset = load_image_folder(folder, image_size, 3 if channels is None else channels)
        dataset.split = split
        return dataset
    elif name == "shapes":
        from flowdit.data.shapes import load_shapes  # scipy is imported only when used

        if channels is not None and channels != 3:
            raise DataError(f"shapes images have 3 channels; channels={channels} is not supported for it")
        return load_shapes(split, image_size)
    else:
        raise DataError(
            f"unknown data set {name!r}; valid names are {', '.join(DATASET_NAMES)}"
        )

    c, h, _ = dataset.shape
    if image_size is not None and image_size != h:
        raise DataError(
            f"{name} images are {h}x{h}; image_size={image_size} is not supported for it "
            f"(leave image_size unset)"
        )
    if channels is not None and channels != c:
        raise DataError(
            f"{name} images have {c} channel(s); channels={channels} is not supported for it"
        )
    return dataset
