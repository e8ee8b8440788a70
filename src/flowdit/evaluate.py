"""Score generated samples against a data set with the shipped evaluator networks.

``evaluate_samples`` returns, for images ``[N, C, H, W]`` in ``[-1, 1]`` (and their
requested labels, if any):

* ``fid``: Frechet distance between the evaluator's 128-d penultimate features of the
  samples and of the real training images (not Inception features: say "FID (evaluator
  features)" when quoting it);
* ``fid_guide``: the same in the guide network's 96-d feature space, a second view so
  that a low FID is not only a class-purity score;
* ``precision`` / ``recall``: improved precision and recall (Kynkaanniemi et al. 2019,
  k = 3) in the evaluator's feature space, against as many real images as samples;
* ``class_accuracy``: the fraction of samples the evaluator assigns to their label.

Samples are scored as they would be saved: clamped to ``[-1, 1]`` and rounded to 8 bits
(``to_float(to_uint8(x))``), so that a tensor held in memory and the ``.npz`` written from
it get the same numbers, and values beyond the pixel range (which no image file can hold)
are never scored as they are.

Real-data features are computed once per (data set, split, network weights) and cached
under ``$FLOWDIT_CACHE`` (default ``~/.cache/flowdit``). A cached file that cannot be read
or does not hold what it should (a crash or a full disk while it was written, a hand
edit) is reported in one line, replaced and recomputed.

Samples are refused, naming the file, when there are none or when a label lies outside the
data set's classes (a label the evaluator can never predict would silently score 0).
"""

from __future__ import annotations

import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import build_dataset, to_float, to_uint8
from .errors import DataError
from .eval.evaluator import WEIGHTS_DIR, load_classifier, predict
from .eval.fid import feature_statistics, frechet_distance
from .eval.prdc import precision_recall
from .utils.files import atomic_write


def cache_dir() -> Path:
    return Path(os.environ.get("FLOWDIT_CACHE", Path.home() / ".cache" / "flowdit"))


def _read_reference(path: Path, num_features: int) -> Optional[dict]:
    """The cached reference statistics in ``path``, or None (with a one-line notice) when
    the file is unreadable or its arrays are missing, mis-shaped or not finite."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("features", "mu", "sigma", "labels")}
        n, f = out["features"].shape
        ok = (f == num_features and out["mu"].shape == (f,) and out["sigma"].shape == (f, f)
              and out["labels"].shape == (n,) and n >= 2
              and all(np.isfinite(out[k]).all() for k in ("features", "mu", "sigma")))
        reason = "unexpected shapes or non-finite values"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        ok, reason = False, str(e).splitlines()[0] if str(e) else type(e).__name__
    if ok:
        return out
    print(f"flowdit: cached reference statistics {path} are damaged ({reason}); recomputing", file=sys.stderr)
    return None


def reference_features(dataset: str, root: Optional[str], split: str, kind: str,
                       weights_dir: Optional[Path] = None) -> dict:
    """Features of every real image of ``dataset``/``split`` under network ``kind``, with
    their mean and covariance: ``{"features" [N, F] float32, "mu", "sigma", "labels"}``,
    cached on disk keyed by the network's SHA-256 (a damaged cache file is recomputed)."""
    net, entry = load_classifier(dataset, kind, weights_dir or WEIGHTS_DIR)
    path = cache_dir() / "reference" / f"{dataset}_{split}_{kind}_{entry['sha256'][:16]}.npz"
    if path.is_file():
        cached = _read_reference(path, int(net.head.in_features))
        if cached is not None:
            return cached
    data = build_dataset(dataset, root=root, split=split)
    x, y = data.batch(torch.arange(len(data)))
    feats, _ = predict(net, x)
    feats = feats.numpy().astype(np.float32)
    mu, sigma = feature_statistics(feats)
    out = {"features": feats, "mu": mu, "sigma": sigma, "labels": y.numpy()}
    atomic_write(path, lambda f: np.savez(f, **out))
    return out


def check_shape(images: torch.Tensor, dataset: str, root: Optional[str]) -> None:
    """Refuse samples whose shape is not the data set's ``[C, H, W]``."""
    data = build_dataset(dataset, root=root, split="test")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(data.shape):
        raise DataError(
            f"samples have shape {tuple(images.shape)} but {dataset} images are [N, "
            f"{', '.join(map(str, data.shape))}] (channels, height, width)"
        )


def check_labels(labels: Optional[torch.Tensor], num_classes: int, source: str = "samples") -> None:
    """Refuse labels outside ``0..num_classes-1``, naming ``source`` and the first bad one."""
    if labels is None:
        return
    labels = torch.as_tensor(labels)
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{source}: label {int(labels[i])} (sample {i}, {len(bad)} in all) is outside the "
                        f"data set's classes 0..{num_classes - 1}")


@torch.no_grad()
def evaluate_samples(images: torch.Tensor, labels: Optional[torch.Tensor], dataset: str,
                     root: Optional[str] = None, ref_split: str = "train", seed: int = 0,
                     weights_dir: Optional[Path] = None, source: str = "samples") -> dict:
    """All sample metrics (see the module docstring) as a flat dict of floats.

    ``weights_dir``: evaluator / guide networks written by ``flowdit evaluator train``
    (default: the shipped ones). ``source`` names the samples in error messages.
    """
    if len(images) < 2:
        raise DataError(f"{source}: holds {len(images)} image(s); scoring needs at least 2 (a covariance)")
    check_shape(images, dataset, root)
    images = to_float(to_uint8(images))
    t0 = time.perf_counter()
    out: dict = {"dataset": dataset, "num_samples": len(images), "reference_split": ref_split}
    for kind, prefix in (("evaluator", ""), ("guide", "_guide")):
        net, entry = load_classifier(dataset, kind, weights_dir or WEIGHTS_DIR)
        if kind == "evaluator":
            check_labels(labels, int(entry["arch"]["num_classes"]), source)
        ref = reference_features(dataset, root, ref_split, kind, weights_dir)
        feats, logits = predict(net, images.float())
        mu, sigma = feature_statistics(feats.numpy())
        out["fid" + prefix] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        if kind == "evaluator":
            n = min(len(images), len(ref["features"]))
            pick = np.random.default_rng(seed).choice(len(ref["features"]), n, replace=False)
            pr = precision_recall(torch.from_numpy(ref["features"][pick]), feats[:n], k=3)
            out["precision"], out["recall"] = pr["precision"], pr["recall"]
            if labels is not None:
                out["class_accuracy"] = float((logits.argmax(1) == torch.as_tensor(labels)).float().mean())
    out["fid_features"] = "flowdit evaluator penultimate (128-d); fid_guide: guide network (96-d)"
    out["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return out


class _Uint8RGB(torch.utils.data.Dataset):
    """Images ``[N, C, H, W]`` in ``[-1, 1]`` as the uint8 ``[3, H, W]`` items torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = ((self.images[i].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def inception_fid(images: torch.Tensor, dataset: str, root: Optional[str], weights_path: str,
                  ref_split: str = "train") -> float:
    """Standard Inception FID through torch-fidelity, from Inception weights the user has
    locally (nothing is downloaded). flowdit does not reimplement it: this only adapts
    the images (grayscale repeated to RGB, uint8) and calls the package."""
    if not Path(weights_path).is_file():
        raise DataError(f"Inception weights not found at {weights_path}")
    try:
        import torch_fidelity
    except ImportError:
        raise DataError("Inception FID needs torch-fidelity: pip install torch-fidelity") from None
    data = build_dataset(dataset, root=root, split=ref_split)
    real, _ = data.batch(torch.arange(len(data)))
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8RGB(images), input2=_Uint8RGB(real), fid=True, verbose=False,
        cuda=torch.cuda.is_available(), feature_extractor_weights_path=weights_path,
    )
    return float(metrics["frechet_inception_distance"])
