"""In-memory image data sets and the uint8 <-> [-1, 1] conversions.

Every data set flowdit trains on fits in memory, so it is held as one uint8 tensor
``[N, C, H, W]`` (a quarter of the float32 size) and converted to float on the fly,
one batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.utils.data import Dataset

from flowdit.errors import DataError

__all__ = ["ImageDataset", "to_float", "to_uint8"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels 0..255 to float32 in [-1, 1] (0 -> -1, 255 -> 1).

    Works on any shape; returns a float32 tensor of the same shape and device.
    """
    if images.dtype != torch.uint8:
        raise DataError(f"to_float expects a uint8 tensor, got dtype {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Map floats in [-1, 1] to uint8 0..255 (rounded to nearest, clamped).

    Works on any shape; returns a uint8 tensor of the same shape and device.
    ``to_uint8(to_float(u))`` is exactly ``u`` for every uint8 ``u``.
    """
    if not images.is_floating_point():
        raise DataError(f"to_uint8 expects a float tensor in [-1, 1], got dtype {images.dtype}")
    # A diverged sampler can emit NaN; casting NaN to uint8 is undefined, so it
    # becomes mid-grey instead of garbage (the caller can still see it in the picture).
    x = torch.nan_to_num(images.to(torch.float32), nan=0.0)
    return ((x + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


@dataclass(eq=False, repr=False)
class ImageDataset(Dataset):
    """A labelled image data set held in memory.

    Attributes:
        images: uint8 tensor ``[N, C, H, W]`` (C is 1 or 3).
        labels: int64 tensor ``[N]`` with values in ``[0, num_classes)``.
        num_classes: number of classes.
        class_names: one name per class (defaults to ``"0"``, ``"1"``, ...).
        name: the data set's name (``"digits"``, ``"mnist"``, a folder name...).
        split: which split this is (``"train"``, ``"test"``, ``"all"``), or None.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    name: str = "images"
    split: str | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                f"{self.name}: images must be a uint8 tensor [N, C, H, W], got "
                f"{_describe(images)}"
            )
        if images.shape[1] not in (1, 3):
            raise DataError(
                f"{self.name}: images must have 1 or 3 channels, got shape {tuple(images.shape)}"
            )
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise DataError(f"{self.name}: labels must be a tensor [N], got {_describe(labels)}")
        if labels.dtype != torch.int64:
            if labels.is_floating_point() or labels.dtype == torch.bool:
                raise DataError(f"{self.name}: labels must be integers, got dtype {labels.dtype}")
            self.labels = labels = labels.to(torch.int64)
        if labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{self.name}: {labels.shape[0]} labels for {images.shape[0]} images"
            )
        if self.num_classes < 1:
            raise DataError(f"{self.name}: num_classes must be >= 1, got {self.num_classes}")
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise DataError(
                f"{self.name}: {len(self.class_names)} class names for "
                f"num_classes={self.num_classes}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DataError(
                f"{self.name}: labels must lie in 0..{self.num_classes - 1}, found "
                f"{int(labels.min())}..{int(labels.max())}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one image, ``(C, H, W)``."""
        _, c, h, w = self.images.shape
        return (c, h, w)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image ``i`` as float32 ``[C, H, W]`` in [-1, 1], and its label as an int."""
        return to_float(self.images[i]), int(self.labels[i])

    def batch(
        self,
        indices: torch.Tensor | Sequence[int],
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather a batch by index in one vectorised op.

        Args:
            indices: int64 tensor ``[B]`` (or a sequence of ints).
            device: where to put the batch; the gather happens on the images'
                device and the conversion to float after the move.

        Returns:
            images float32 ``[B, C, H, W]`` in [-1, 1], labels int64 ``[B]``.
        """
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        if idx.dim() != 1:
            raise DataError(
                f"{self.name}: batch indices must be a 1-D tensor, got shape {tuple(idx.shape)}"
            )
        images, labels = self.images[idx], self.labels[idx]
        if device is not None:
            # Move uint8, then convert: a quarter of the bytes of moving float32.
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        return to_float(images), labels

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split is not None else ""
        return (
            f"ImageDataset(name={self.name!r}{split}, n={len(self)}, shape={self.shape}, "
            f"num_classes={self.num_classes})"
        )


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
