"""Image grids (PNG) and sample files (.npz, ADM evaluator layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowdit.data import to_float
from flowdit.errors import DataError
from flowdit.utils.images import load_npz, make_grid, save_grid_png, save_npz


def _images(n=5, c=1, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return pixels, to_float(pixels)


def test_make_grid_layout():
    pixels, x = _images(n=5, c=3, h=4, w=6)
    grid = make_grid(x, nrow=3, padding=2, upscale=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (12 + 2) + 2, 3)
    # Image 4 sits in row 1, column 1; each pixel is a 2x2 block.
    tile = grid[2 + 10 : 2 + 10 + 8, 2 + 14 : 2 + 14 + 12]
    expected = pixels[4].permute(1, 2, 0).numpy().repeat(2, 0).repeat(2, 1)
    assert np.array_equal(tile, expected)
    # Padding and the empty sixth slot stay at the pad value.
    assert (grid[:2] == 128).all() and (grid[12:, 30:] == 128).all()
    assert (make_grid(x, nrow=3, pad_value=7)[0] == 7).all()


def test_make_grid_rejects_bad_input():
    with pytest.raises(DataError, match="shape"):
        make_grid(torch.zeros(3, 8, 8), nrow=2)
    with pytest.raises(DataError, match="dtype"):
        make_grid(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), nrow=2)


def test_save_grid_png_size_and_mode(tmp_path):
    _, x = _images(n=10, c=1, h=8, w=8)
    path = save_grid_png(x, tmp_path / "sub" / "grid.png")
    with Image.open(path) as im:
        # 10 images -> 4 per row, 3 rows; 8 px upscaled x4 to 32 px, 1 px padding.
        assert im.mode == "L"
        assert im.size == (4 * 33 + 1, 3 * 33 + 1)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]

    _, rgb = _images(n=2, c=3, h=40, w=40)
    save_grid_png(rgb, tmp_path / "rgb.png", nrow=2, upscale=1)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB" and im.size == (2 * 41 + 1, 41 + 1)


def test_npz_round_trip_exact(tmp_path):
    pixels, x = _images(n=6, c=3, h=5, w=7)
    labels = torch.tensor([0, 3, 9, 1, 1, 2])
    path = save_npz(tmp_path / "samples.npz", x, labels)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 5, 7, 3)
        assert data["arr_1"].dtype == np.int64 and data["arr_1"].shape == (6,)
        assert np.array_equal(data["arr_0"], pixels.permute(0, 2, 3, 1).numpy())
    images, got_labels = load_npz(path)
    assert images.dtype == torch.float32 and images.shape == (6, 3, 5, 7)
    assert torch.equal(images, x)
    assert torch.equal(got_labels, labels)


def test_npz_without_labels(tmp_path):
    _, x = _images(n=3, c=1)
    save_npz(tmp_path / "s.npz", x)
    with np.load(tmp_path / "s.npz") as data:
        assert data.files == ["arr_0"] and data["arr_0"].shape == (3, 8, 8, 1)
    images, labels = load_npz(tmp_path / "s.npz")
    assert labels is None and images.shape == (3, 1, 8, 8)


def test_save_npz_rejects_bad_labels(tmp_path):
    _, x = _images(n=3)
    with pytest.raises(DataError, match=r"shape \[3\]"):
        save_npz(tmp_path / "s.npz", x, torch.tensor([1, 2]))


def test_load_npz_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "no_arr0.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="no 'arr_0'.*images"):
        load_npz(tmp_path / "no_arr0.npz")
    np.savez(tmp_path / "float.npz", np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_npz(tmp_path / "float.npz")
    np.savez(tmp_path / "rank.npz", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"\[N, H, W, C\]"):
        load_npz(tmp_path / "rank.npz")
    np.savez(tmp_path / "nchw.npz", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="channels-last"):
        load_npz(tmp_path / "nchw.npz")
    np.savez(tmp_path / "labels.npz", np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(DataError, match="arr_1"):
        load_npz(tmp_path / "labels.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="junk.npz"):
        load_npz(tmp_path / "junk.npz")
