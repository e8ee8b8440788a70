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
under ``$FLOWDIT_CACHE`` (default ``~/.cache/flowdit``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import build_dataset, to_float, to_uint8
from .errors import DataError
from .eval.evaluator import load_classifier, predict
from .eval.fid import feature_statistics, frechet_distance
from .eval.prdc import precision_recall


def cache_dir() -> Path:
    return Path(os.environ.get("FLOWDIT_CACHE", Path.home() / ".cache" / "flowdit"))


def reference_features(dataset: str, root: Optional[str], split: str, kind: str) -> dict:
    """Features of every real image of ``dataset``/``split`` under network ``kind``, with
    their mean and covariance: ``{"features" [N, F] float32, "mu", "sigma", "labels"}``,
    cached on disk keyed by the network's SHA-256."""
    net, entry = load_classifier(dataset, kind)
    path = cache_dir() / "reference" / f"{dataset}_{split}_{kind}_{entry['sha256'][:16]}.npz"
    if path.is_file():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    data = build_dataset(dataset, root=root, split=split)
    x, y = data.batch(torch.arange(len(data)))
    feats, _ = predict(net, x)
    feats = feats.numpy().astype(np.float32)
    mu, sigma = feature_statistics(feats)
    out = {"features": feats, "mu": mu, "sigma": sigma, "labels": y.numpy()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def check_shape(images: torch.Tensor, dataset: str, root: Optional[str]) -> None:
    """Refuse samples whose shape is not the data set's ``[C, H, W]``."""
    data = build_dataset(dataset, root=root, split="test")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(data.shape):
        raise DataError(
            f"samples have shape {tuple(images.shape)} but {dataset} images are [N, "
            f"{', '.join(map(str, data.shape))}] (channels, height, width)"
        )


@torch.no_grad()
def evaluate_samples(images: torch.Tensor, labels: Optional[torch.Tensor], dataset: str,
                     root: Optional[str] = None, ref_split: str = "train", seed: int = 0) -> dict:
    """All sample metrics (see the module docstring) as a flat dict of floats."""
    check_shape(images, dataset, root)
    images = to_float(to_uint8(images))
    t0 = time.perf_counter()
    out: dict = {"dataset": dataset, "num_samples": len(images), "reference_split": ref_split}
    for kind, prefix in (("evaluator", ""), ("guide", "_guide")):
        net, entry = load_classifier(dataset, kind)
        ref = reference_features(dataset, root, ref_split, kind)
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
