"""Image grids as PNG, and sample batches as ``.npz`` in the ADM evaluator's layout."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flowdit.data.base import to_float, to_uint8
from flowdit.errors import DataError
from flowdit.utils.files import atomic_write

__all__ = ["make_grid", "save_grid_png", "make_captioned_grid", "save_captioned_grid", "save_npz",
           "load_npz", "default_upscale"]

MIN_TILE_PIXELS = 32


def _check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise DataError(
            f"{what}: expected float images [N, C, H, W] with N >= 1 and C in (1, 3), "
            f"got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise DataError(f"{what}: expected float images in [-1, 1], got dtype {images.dtype}")
    return images.detach().cpu()


def default_upscale(height: int, width: int) -> int:
    """The smallest integer factor that makes an image at least 32 px on its short side."""
    return max(1, math.ceil(MIN_TILE_PIXELS / max(1, min(height, width))))


def make_grid(
    images: torch.Tensor,
    nrow: int,
    padding: int = 1,
    upscale: int = 1,
    pad_value: int = 128,
) -> np.ndarray:
    """Tile images into one picture, row by row, ``nrow`` images per row.

    Each image is first upscaled by ``upscale`` with nearest-neighbour (so pixels stay
    sharp), then laid out with ``padding`` pixels of ``pad_value`` between images and
    around the border. The grey default keeps tiles apart on black backgrounds
    (MNIST, digits), where torchvision's black padding makes them run together.

    Args:
        images: float ``[N, C, H, W]`` in [-1, 1], C in (1, 3).

    Returns:
        uint8 numpy ``[rows * (H*upscale + padding) + padding,
        nrow * (W*upscale + padding) + padding, C]`` with ``rows = ceil(N / nrow)``.
    """
    images = _check_images(images, "make_grid")
    if nrow < 1 or padding < 0 or upscale < 1:
        raise DataError(
            f"make_grid: need nrow >= 1, padding >= 0, upscale >= 1; got "
            f"nrow={nrow}, padding={padding}, upscale={upscale}"
        )
    tiles = to_uint8(images).permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    if upscale > 1:
        tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = tiles.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / nrow)
    grid = np.full(
        (nrows * (h + padding) + padding, ncol * (w + padding) + padding, c),
        pad_value,
        dtype=np.uint8,
    )
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = tiles[k]
    return grid


def save_grid_png(
    images: torch.Tensor,
    path: str | Path,
    nrow: int | None = None,
    upscale: int | None = None,
) -> Path:
    """Save images as one PNG grid, written atomically.

    Args:
        images: float ``[N, C, H, W]`` in [-1, 1]; C = 1 is saved as grayscale (mode L).
        path: the PNG file; parent folders are created.
        nrow: images per row; default ``ceil(sqrt(N))`` (a near-square grid).
        upscale: nearest-neighbour factor; default makes each image >= 32 px.

    Returns:
        the path written.
    """
    images = _check_images(images, f"save_grid_png({path})")
    n, _, h, w = images.shape
    nrow = nrow if nrow is not None else math.ceil(math.sqrt(n))
    upscale = upscale if upscale is not None else default_upscale(h, w)
    grid = make_grid(images, nrow=nrow, upscale=upscale)
    # A 2-D uint8 array becomes mode L, [H, W, 3] becomes RGB.
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    return atomic_write(Path(path), lambda f: picture.save(f, format="PNG"))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` to lines at most ``width`` pixels wide."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def make_captioned_grid(
    images: torch.Tensor,
    captions: list[str],
    nrow: int | None = None,
    upscale: int | None = None,
    padding: int = 4,
    font_size: int = 11,
    max_lines: int = 4,
) -> np.ndarray:
    """Tile images with a caption under each (text-to-image samples, captioned data).

    Each tile is the image upscaled by ``upscale`` (nearest neighbour) with its caption
    word-wrapped to the tile's width below it (at most ``max_lines`` lines, the last one
    ending in "..." when cut), in black on white.

    Args:
        images: float ``[N, C, H, W]`` in [-1, 1], C in (1, 3).
        captions: N strings.
        nrow: tiles per row; default ``ceil(sqrt(N))``.
        upscale: default makes each image at least 96 px wide.

    Returns:
        uint8 numpy ``[rows * (H*upscale + text + padding) + padding,
        nrow * (W*upscale + padding) + padding, 3]``.
    """
    from PIL import ImageDraw

    images = _check_images(images, "make_captioned_grid")
    n, c, h, w = images.shape
    if len(captions) != n:
        raise DataError(f"make_captioned_grid: {len(captions)} captions for {n} images")
    nrow = nrow if nrow is not None else math.ceil(math.sqrt(n))
    upscale = upscale if upscale is not None else max(1, math.ceil(96 / w))
    if nrow < 1 or upscale < 1 or padding < 0 or max_lines < 1:
        raise DataError(f"make_captioned_grid: need nrow, upscale, max_lines >= 1 and padding >= 0; got "
                        f"nrow={nrow}, upscale={upscale}, padding={padding}, max_lines={max_lines}")
    tiles = to_uint8(images).permute(0, 2, 3, 1).numpy()
    if c == 1:
        tiles = tiles.repeat(3, axis=3)
    tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    th, tw = h * upscale, w * upscale
    font = _font(font_size)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = []
    for text in captions:
        lines = _wrap(scratch, text, font, tw)
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1] + " ..."
        wrapped.append(lines)
    line_h = font_size + 2
    text_h = line_h * max(1, max(len(x) for x in wrapped)) + 2
    ncol, nrows = min(nrow, n), math.ceil(n / nrow)
    canvas = Image.new("RGB", (ncol * (tw + padding) + padding, nrows * (th + text_h + padding) + padding),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k in range(n):
        r, col = divmod(k, nrow)
        x, y = padding + col * (tw + padding), padding + r * (th + text_h + padding)
        canvas.paste(Image.fromarray(tiles[k]), (x, y))
        for j, line in enumerate(wrapped[k]):
            draw.text((x, y + th + 1 + j * line_h), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_captioned_grid(
    images: torch.Tensor,
    captions: list[str],
    path: str | Path,
    nrow: int | None = None,
    upscale: int | None = None,
    **kwargs,
) -> Path:
    """Save :func:`make_captioned_grid` as a PNG, atomically (``kwargs`` go to it).

    Args:
        images: float ``[N, C, H, W]`` in [-1, 1].
        captions: N strings.
        path: the PNG file; parent folders are created.

    Returns:
        the path written.
    """
    grid = make_captioned_grid(images, captions, nrow=nrow, upscale=upscale, **kwargs)
    picture = Image.fromarray(grid)
    return atomic_write(Path(path), lambda f: picture.save(f, format="PNG", optimize=True))


def save_npz(
    path: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> Path:
    """Save samples the way guided-diffusion's sampler does, for the ADM evaluator.

    Writes ``arr_0`` uint8 ``[N, H, W, C]`` and, when labels are given, ``arr_1``
    int64 ``[N]``. The file is written atomically and the path is kept as given
    (no ``.npz`` is appended).

    Args:
        images: float ``[N, C, H, W]`` in [-1, 1].
        labels: integer ``[N]`` or None.

    Returns:
        the path written.
    """
    images = _check_images(images, f"save_npz({path})")
    arrays = {"arr_0": to_uint8(images).permute(0, 2, 3, 1).contiguous().numpy()}
    if labels is not None:
        labels = torch.as_tensor(labels).detach().cpu()
        if labels.shape != (images.shape[0],) or labels.is_floating_point():
            raise DataError(
                f"save_npz({path}): labels must be integers of shape [{images.shape[0]}], "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        arrays["arr_1"] = labels.to(torch.int64).numpy()
    return atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load a sample file written by :func:`save_npz` (or by guided-diffusion).

    Returns:
        images float32 ``[N, C, H, W]`` in [-1, 1], and labels int64 ``[N]`` if the
        file has ``arr_1``, else None.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sample file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: holds a single .npy array, expected an .npz with arr_0")
        with data:
            keys = list(data.files)
            arrays = {k: data[k] for k in keys if k in ("arr_0", "arr_1")}
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        # numpy raises ValueError for unknown formats and for pickled object arrays.
        raise DataError(f"{path}: not a readable .npz file ({e})") from e
    if "arr_0" not in arrays:
        raise DataError(
            f"{path}: no 'arr_0' (uint8 images [N, H, W, C]); the file holds "
            f"{', '.join(keys) or 'nothing'}"
        )
    pixels, labels = arrays["arr_0"], arrays.get("arr_1")

    if pixels.dtype != np.uint8:
        raise DataError(f"{path}: arr_0 must be uint8, got {pixels.dtype}")
    if pixels.ndim != 4 or pixels.shape[3] not in (1, 3):
        raise DataError(
            f"{path}: arr_0 must be channels-last [N, H, W, C] with C in (1, 3), "
            f"got shape {pixels.shape}"
        )
    images = to_float(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
    if labels is None:
        return images, None
    integer = np.issubdtype(labels.dtype, np.integer)
    if labels.ndim != 1 or labels.shape[0] != pixels.shape[0] or not integer:
        raise DataError(
            f"{path}: arr_1 must be integer labels of shape [{pixels.shape[0]}], "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    return images, torch.from_numpy(labels.astype(np.int64))
