"""Image folders: ``root/<class name>/<image files>``, loaded into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from flowdit.data.base import ImageDataset
from flowdit.errors import DataError

__all__ = ["load_image_folder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_image_folder(root: str | Path, image_size: int, channels: int = 3) -> ImageDataset:
    """Load every image under ``root/<class>/`` into memory.

    Class names are the subfolder names in sorted order (label i is the i-th name).
    Each image is converted to grayscale (``channels=1``) or RGB (``channels=3``),
    center-cropped to a square (so it is not stretched) and resized with bicubic
    filtering to ``image_size x image_size``. Files with other extensions and hidden
    folders are ignored.

    Returns:
        images uint8 ``[N, channels, image_size, image_size]``, labels int64 ``[N]``.
    """
    root = Path(root).expanduser()
    if channels not in (1, 3):
        raise DataError(f"image folder {root}: channels must be 1 or 3, got {channels}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(
            f"image folder {root}: image_size must be a positive int, got {image_size!r}"
        )
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"image folder {root} has no class subfolders; expected {root}/<class name>/<images>"
        )

    mode = "L" if channels == 1 else "RGB"
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DataError(
                f"image folder {root}: class folder {class_dir.name!r} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        for path in files:
            arrays.append(_load_one(path, mode, image_size))
            labels.append(label)

    stacked = np.stack(arrays)
    if channels == 1:
        stacked = stacked[:, None]
    else:
        stacked = stacked.transpose(0, 3, 1, 2)
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(stacked)),
        labels=torch.tensor(labels, dtype=torch.int64),
        num_classes=len(class_dirs),
        class_names=[p.name for p in class_dirs],
        name=root.name or str(root),
        split=None,
    )


def _load_one(path: Path, mode: str, size: int) -> np.ndarray:
    """One image as uint8 ``[size, size]`` (mode L) or ``[size, size, 3]`` (RGB)."""
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            w, h = im.size
            side = min(w, h)
            if w != h:
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side))
            if side != size:
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        # PIL raises several types for corrupt files (SyntaxError for some broken PNGs).
        raise DataError(f"cannot read image {path}: {e}") from e
