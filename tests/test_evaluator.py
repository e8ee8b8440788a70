"""The shipped evaluator and guide networks, and ``flowdit eval``."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdit.cli import main
from flowdit.data import load_digits, load_mnist, to_float, to_uint8
from flowdit.errors import CheckpointError, DataError
from flowdit.eval.evaluator import WEIGHTS_DIR, accuracy, load_classifier, read_manifest
from flowdit.utils.files import sha256_file
from flowdit.evaluate import evaluate_samples
from flowdit.utils.images import save_npz

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWDIT_CACHE", str(tmp_path / "cache"))


def _digits_test():
    d = load_digits("test")
    return d.batch(torch.arange(len(d)))


@pytest.mark.parametrize("kind", ["evaluator", "guide"])
def test_shipped_digits_networks_match_checksum_and_stated_accuracy(kind):
    net, entry = load_classifier("digits", kind)
    assert sha256_file(WEIGHTS_DIR / entry["file"]) == entry["sha256"]
    x, y = _digits_test()
    acc = accuracy(net, x, y)
    assert abs(acc - entry["test_accuracy"]) <= 1 / len(y) + 1e-9
    assert acc >= (0.97 if kind == "evaluator" else 0.95)


@pytest.mark.parametrize("kind", ["evaluator", "guide"])
def test_shipped_mnist_networks_reach_their_stated_accuracy(kind):
    if not MNIST.is_dir():
        pytest.skip(f"MNIST not found at {MNIST}")
    if f"mnist/{kind}" not in read_manifest():
        pytest.skip("no shipped MNIST networks")
    net, entry = load_classifier("mnist", kind)
    test = load_mnist(MNIST, "test")
    x, y = test.batch(torch.arange(len(test)))
    assert entry["test_accuracy"] >= (0.99 if kind == "evaluator" else 0.97)
    # The whole test split: the stated number, up to a few images of thread-order noise.
    assert abs(accuracy(net, x, y) - entry["test_accuracy"]) <= 5 / len(y)


def test_corrupt_weights_are_refused(tmp_path):
    wd = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, wd)
    f = wd / read_manifest(wd)["digits/evaluator"]["file"]
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_classifier("digits", "evaluator", wd)
    with pytest.raises(DataError, match="flowdit evaluator train"):
        load_classifier("cifar", "evaluator", wd)


def test_real_images_score_well_and_noise_badly():
    x, y = _digits_test()
    real = evaluate_samples(x, y, "digits")
    noise = evaluate_samples(torch.rand_like(x) * 2 - 1, y, "digits")
    assert real["class_accuracy"] > 0.97 and noise["class_accuracy"] < 0.5
    assert real["fid"] < noise["fid"] / 10 and real["fid_guide"] < noise["fid_guide"] / 10
    # Measured: precision 0.91 vs 0.15, recall 0.92 vs 0.04 (359 images, k = 3).
    assert real["precision"] > 0.8 and noise["precision"] < 0.3
    assert real["recall"] > 0.8 and noise["recall"] < 0.2
    # Blurring the real images moves them away from the data: FID grows.
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert evaluate_samples(blurred, y, "digits")["fid"] > real["fid"]


def test_eval_cli_writes_the_promised_json(tmp_path, capsys):
    x, y = _digits_test()
    npz = tmp_path / "s.npz"
    save_npz(npz, x[:100], y[:100])
    out = tmp_path / "m.json"
    assert main(["eval", "--samples", str(npz), "--dataset", "digits", "--out", str(out),
                 "--solver", "heun", "--steps", "8", "--nfe", "16", "--cfg", "1.5", "--seed", "3"]) == 0
    m = json.loads(out.read_text())
    for key in ("fid", "fid_guide", "precision", "recall", "class_accuracy", "num_samples", "dataset",
                "solver", "steps", "nfe", "cfg", "seed"):
        assert key in m, key
    assert m["num_samples"] == 100 and m["nfe"] == 16 and m["dataset"] == "digits"

    bad = tmp_path / "bad.npz"
    np.savez(bad, arr_0=np.zeros((4, 28, 28, 1), np.uint8))
    assert main(["eval", "--samples", str(bad), "--dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[N, 1, 8, 8]" in err[0]
    assert main(["eval", "--samples", str(npz)]) == 2
    assert "--dataset" in capsys.readouterr().err


def test_inception_fid_without_weights_is_a_clear_error(tmp_path, capsys):
    x, y = _digits_test()
    npz = tmp_path / "s.npz"
    save_npz(npz, x[:20], y[:20])
    missing = tmp_path / "inception.pth"
    assert main(["eval", "--samples", str(npz), "--dataset", "digits", "--inception-weights", str(missing)]) == 2
    assert "Inception weights not found" in capsys.readouterr().err


def test_samples_are_scored_as_saved_images():
    # An overshooting sampler's values beyond [-1, 1] cannot be stored in an image file; the
    # in-memory tensor must get the numbers of its own saved (clamped, 8-bit) copy.
    x, y = _digits_test()
    over = x * 1.6 + 0.05 * torch.randn_like(x)
    saved = to_float(to_uint8(over))
    a, b = evaluate_samples(over, y, "digits"), evaluate_samples(saved, y, "digits")
    for k in ("fid", "fid_guide", "precision", "recall", "class_accuracy"):
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
