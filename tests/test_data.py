"""Data sets: digits, MNIST IDX parsing and validation, image folders, batching."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowdit.data import (
    ImageDataset,
    build_dataset,
    load_digits,
    load_image_folder,
    load_mnist,
    to_float,
    to_uint8,
)
from flowdit.errors import DataError

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
MNIST_TRAIN_IMAGES_SHA256 = "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"


# ---------------------------------------------------------------- conversions / base


def test_uint8_float_round_trip_is_exact():
    u = torch.arange(256, dtype=torch.uint8)
    f = to_float(u)
    assert f.dtype == torch.float32
    assert f[0] == -1.0 and f[-1] == 1.0
    assert torch.equal(to_uint8(f), u)


def test_to_uint8_clamps_rounds_and_maps_nan():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, float("nan")])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 128]


def _toy(n=6, c=1, h=4, w=5, num_classes=3):
    images = torch.arange(n * c * h * w, dtype=torch.int64).remainder(256).to(torch.uint8)
    return ImageDataset(
        images=images.reshape(n, c, h, w),
        labels=torch.arange(n) % num_classes,
        num_classes=num_classes,
        name="toy",
    )


def test_batch_gathers_by_index():
    ds = _toy()
    idx = torch.tensor([4, 0, 4, 2])
    x, y = ds.batch(idx)
    assert x.shape == (4, 1, 4, 5) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [1, 0, 1, 2]
    for row, i in enumerate(idx.tolist()):
        img, label = ds[i]
        assert torch.equal(x[row], img) and label == y[row]
        assert torch.equal(to_uint8(x[row]), ds.images[i])


def test_dataset_basics():
    ds = _toy()
    assert len(ds) == 6 and ds.shape == (1, 4, 5)
    assert ds.class_names == ["0", "1", "2"]
    img, label = ds[1]
    assert img.shape == (1, 4, 5) and isinstance(label, int)
    assert "toy" in repr(ds)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(images=torch.zeros(2, 1, 4, 4)), "uint8"),
        (dict(images=torch.zeros(2, 2, 4, 4, dtype=torch.uint8)), "channels"),
        (dict(labels=torch.tensor([0, 1, 2])), "3 labels for 2 images"),
        (dict(labels=torch.tensor([0, 7])), r"0\.\.2"),
        (dict(class_names=["a"]), "class names"),
    ],
)
def test_dataset_rejects_bad_fields(kwargs, match):
    fields = dict(
        images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        labels=torch.tensor([0, 1]),
        num_classes=3,
    )
    fields.update(kwargs)
    with pytest.raises(DataError, match=match):
        ImageDataset(**fields)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return {s: load_digits(s) for s in ("train", "test", "all")}


def test_digits_shapes_and_range(digits):
    full = digits["all"]
    assert full.images.shape == (1797, 1, 8, 8) and full.images.dtype == torch.uint8
    assert full.labels.shape == (1797,) and full.labels.dtype == torch.int64
    assert full.num_classes == 10 and full.class_names == [str(i) for i in range(10)]
    assert int(full.images.min()) == 0 and int(full.images.max()) == 255
    assert set(full.labels.tolist()) == set(range(10))
    x, _ = full.batch(torch.arange(len(full)))
    assert x.min() >= -1 and x.max() <= 1


def test_digits_scaling_matches_sklearn(digits):
    from sklearn.datasets import load_digits as sk

    raw = sk()
    expected = np.rint(raw.images * 255 / 16).astype(np.uint8)
    assert np.array_equal(digits["all"].images[:, 0].numpy(), expected)
    assert np.array_equal(digits["all"].labels.numpy(), raw.target)


def test_digits_split_sizes_disjoint_and_stratified(digits):
    train, test, full = digits["train"], digits["test"], digits["all"]
    assert len(train) + len(test) == len(full) == 1797
    assert 0.19 < len(test) / len(full) < 0.21

    # Identify images by their (image bytes, label) so disjointness needs no index.
    def keys(ds):
        return {(bytes(ds.images[i].numpy()), int(ds.labels[i])) for i in range(len(ds))}

    assert keys(train) | keys(test) == keys(full)

    from flowdit.data.digits import digits_split_indices

    tr, te = digits_split_indices(full.labels.numpy())
    assert np.intersect1d(tr, te).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(1797))
    assert torch.equal(train.images, full.images[torch.from_numpy(tr)])
    assert torch.equal(test.labels, full.labels[torch.from_numpy(te)])
    # Stratified: every class keeps ~20% in test.
    counts_all = torch.bincount(full.labels, minlength=10).float()
    counts_test = torch.bincount(test.labels, minlength=10).float()
    assert torch.all((counts_test / counts_all - 0.2).abs() < 0.02)


def test_digits_split_is_deterministic_and_seeded(digits):
    again = load_digits("test")
    assert torch.equal(again.images, digits["test"].images)
    assert torch.equal(again.labels, digits["test"].labels)
    other = load_digits("test", seed=1)
    assert not torch.equal(other.images, digits["test"].images)


def test_digits_bad_arguments():
    with pytest.raises(DataError, match="split"):
        load_digits("validation")
    with pytest.raises(DataError, match="test_fraction"):
        load_digits("train", test_fraction=1.5)


# ---------------------------------------------------------------- MNIST (shared copy)


@pytest.fixture(scope="module")
def mnist_dir():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST copy not found at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="module")
def mnist_train(mnist_dir):
    return load_mnist(mnist_dir, "train")


def test_mnist_train_and_test(mnist_dir, mnist_train):
    train = mnist_train
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.shape == (60000,) and train.labels.dtype == torch.int64
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert torch.bincount(train.labels).tolist()[:2] == [5923, 6742]
    assert train.name == "mnist" and train.split == "train"

    test = load_mnist(mnist_dir, "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


def test_mnist_train_images_checksum(mnist_dir, mnist_train):
    raw = gzip.decompress((mnist_dir / "train-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == MNIST_TRAIN_IMAGES_SHA256
    # The parsed tensor is exactly the payload after the 16-byte header.
    assert mnist_train.images.numpy().tobytes() == raw[16:]


def test_build_dataset_mnist_from_env(mnist_dir, monkeypatch):
    monkeypatch.setenv("FLOWDIT_MNIST", str(mnist_dir))
    ds = build_dataset("mnist", split="test")
    assert len(ds) == 10000


# ---------------------------------------------------------------- MNIST (malformed, tmp_path)


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


def _write_mnist(root: Path, n=5, n_labels=None, labels=None, gz=True, split="train"):
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    n_labels = n if n_labels is None else n_labels
    if labels is None:
        labels = np.arange(n_labels) % 10
    labels = np.asarray(labels, np.uint8)
    files = {
        f"{prefix}-images-idx3-ubyte": _idx(2051, (n, 28, 28), pixels.tobytes()),
        f"{prefix}-labels-idx1-ubyte": _idx(2049, (len(labels),), labels.tobytes()),
    }
    for name, content in files.items():
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(content, compresslevel=1))
        else:
            (root / name).write_bytes(content)
    return pixels, labels


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_small_valid_files(tmp_path, gz):
    pixels, labels = _write_mnist(tmp_path, n=7, gz=gz, split="test")
    ds = load_mnist(tmp_path, "test")
    assert ds.images.shape == (7, 1, 28, 28)
    assert np.array_equal(ds.images[:, 0].numpy(), pixels)
    assert np.array_equal(ds.labels.numpy(), labels)


def test_mnist_missing_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_mnist(tmp_path / "nope")
    assert "train-images-idx3-ubyte.gz" in str(e.value)


def test_mnist_missing_file_lists_expected_names(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        load_mnist(tmp_path)
    msg = str(e.value)
    assert "train-labels-idx1-ubyte.gz" in msg and str(tmp_path) in msg
    assert "t10k-images-idx3-ubyte.gz" in msg


def test_mnist_wrong_magic(tmp_path):
    _write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[:4] = struct.pack(">I", 2049)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic number is 2049, expected 2051") as e:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte" in str(e.value)


@pytest.mark.parametrize("cut", [1, 100, 28 * 28 * 5 + 10])
def test_mnist_truncated(tmp_path, cut):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) - cut]))
    with pytest.raises(DataError, match="truncated") as e:
        load_mnist(tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(e.value)


def test_mnist_trailing_bytes(tmp_path):
    _write_mnist(tmp_path, gz=False)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes() + b"\x00\x01")
    with pytest.raises(DataError, match="trailing bytes") as e:
        load_mnist(tmp_path)
    assert "train-labels-idx1-ubyte" in str(e.value)


def test_mnist_corrupt_gzip(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)


def test_mnist_label_count_mismatch(tmp_path):
    _write_mnist(tmp_path, n=5, n_labels=4)
    with pytest.raises(DataError, match="4 labels") as e:
        load_mnist(tmp_path)
    assert "train-labels-idx1-ubyte.gz" in str(e.value)


def test_mnist_label_out_of_range(tmp_path):
    _write_mnist(tmp_path, n=3, labels=[1, 12, 3])
    with pytest.raises(DataError, match=r"0\.\.9") as e:
        load_mnist(tmp_path)
    assert "train-labels-idx1-ubyte.gz" in str(e.value)


def test_mnist_bad_split(tmp_path):
    with pytest.raises(DataError, match="split"):
        load_mnist(tmp_path, "val")


# ---------------------------------------------------------------- image folders


def _write_folder(root: Path, classes=("cat", "dog"), per_class=2, size=(12, 10)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            rgb = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            ext = ".png" if k % 2 == 0 else ".bmp"
            Image.fromarray(rgb).save(root / name / f"img{k}{ext}")
    (root / classes[0] / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_loads(tmp_path, channels):
    _write_folder(tmp_path / "pets", classes=("dog", "cat"), per_class=3)
    ds = load_image_folder(tmp_path / "pets", image_size=8, channels=channels)
    assert ds.images.shape == (6, channels, 8, 8) and ds.images.dtype == torch.uint8
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.name == "pets"


def test_image_folder_keeps_pixels_at_native_size(tmp_path):
    (tmp_path / "a").mkdir()
    gray = np.arange(36, dtype=np.uint8).reshape(6, 6) * 7
    Image.fromarray(gray).save(tmp_path / "a" / "x.png")
    ds = load_image_folder(tmp_path, image_size=6, channels=1)
    assert np.array_equal(ds.images[0, 0].numpy(), gray)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", image_size=8)
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_image_folder(tmp_path / "empty_root", image_size=8)
    _write_folder(tmp_path / "r")
    (tmp_path / "r" / "zebra").mkdir()
    with pytest.raises(DataError, match="'zebra' holds no images"):
        load_image_folder(tmp_path / "r", image_size=8)
    (tmp_path / "r" / "zebra" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path / "r", image_size=8)
    with pytest.raises(DataError, match="channels"):
        load_image_folder(tmp_path / "r", image_size=8, channels=2)


# ---------------------------------------------------------------- build_dataset


def test_build_dataset_names_and_errors(tmp_path, monkeypatch):
    ds = build_dataset("digits", split="test")
    assert ds.shape == (1, 8, 8) and ds.split == "test"
    assert len(build_dataset("digits", image_size=8, channels=1, split="all")) == 1797
    with pytest.raises(DataError, match="digits, mnist, folder"):
        build_dataset("cifar")
    with pytest.raises(DataError, match="image_size"):
        build_dataset("digits", image_size=32)
    monkeypatch.delenv("FLOWDIT_MNIST", raising=False)
    with pytest.raises(DataError, match="data.root"):
        build_dataset("mnist")

    _write_folder(tmp_path / "f" / "train")
    ds = build_dataset("folder", root=str(tmp_path / "f"), image_size=4, channels=3)
    assert ds.images.shape == (4, 3, 4, 4) and ds.split == "train"
    with pytest.raises(DataError, match="'test' subfolder"):
        build_dataset("folder", root=str(tmp_path / "f"), split="test", image_size=4)
    with pytest.raises(DataError, match="image_size"):
        build_dataset("folder", root=str(tmp_path / "f"))
