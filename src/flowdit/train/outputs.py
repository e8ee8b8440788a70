"""What a finished run leaves for its user: a grid of samples per class, an ``.npz`` of
samples in the ADM evaluator layout, and ``metrics.json`` with the class accuracy that an
independent classifier gives the samples."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..data import build_dataset, to_float, to_uint8
from ..eval.classifier import fit_reference_classifier
from ..inference.generate import balanced_labels, generate  # noqa: F401  (balanced_labels re-exported)
from ..utils.files import write_json
from ..utils.images import save_grid_png, save_npz
from .config import RunConfig, SampleSection


def sample_classes(model, shape, num_classes: int, per_class: int, sc: SampleSection, seed: int,
                   amp_dtype=None, device="cpu", shift: float = 1.0, progress: bool = False):
    """``per_class`` samples of every class, class-major: ``(images [K * per_class, C, H, W], labels)``."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    out = generate(model, labels, shape, solver=sc.solver, steps=sc.steps, cfg_scale=sc.cfg, shift=shift,
                   seed=seed, amp_dtype=amp_dtype, device=device, progress=progress)
    return out.images, out.labels


@torch.no_grad()
def write_run_outputs(run_dir: Path, model, cfg: RunConfig, amp_dtype=None, device="cpu",
                      extra: Optional[dict] = None, progress: bool = True) -> dict:
    """Sample from ``model`` (the EMA weights) and write ``samples.png``, ``samples.npz`` and
    ``metrics.json`` into ``run_dir``. Returns the metrics."""
    sc = cfg.sample
    train = build_dataset(cfg.data.dataset, root=cfg.data.root, split="train",
                          image_size=cfg.data.image_size, channels=cfg.data.channels)
    shape, K = train.shape, train.num_classes

    grid, _ = sample_classes(model, shape, K, sc.per_class, sc, seed=cfg.train.seed + 1,
                             amp_dtype=amp_dtype, device=device, shift=cfg.flow.shift)
    save_grid_png(grid, run_dir / "samples.png", nrow=sc.per_class)

    t0 = time.perf_counter()
    labels = balanced_labels(K, sc.num_eval)
    gen = generate(model, labels, shape, solver=sc.solver, steps=sc.steps, cfg_scale=sc.cfg, shift=cfg.flow.shift,
                   seed=cfg.train.seed + 2, amp_dtype=amp_dtype, device=device, progress=progress)
    sample_seconds = time.perf_counter() - t0
    save_npz(run_dir / "samples.npz", gen.images, gen.labels)

    # Scored as saved: samples.npz holds 8-bit pixels, and its score must be the one reported.
    saved = to_float(to_uint8(gen.images))
    metrics = {
        "dataset": train.name, "num_samples": len(labels), "solver": sc.solver, "steps": sc.steps,
        "nfe": gen.nfe, "cfg": sc.cfg, "seed": cfg.train.seed + 2,
        "sample_seconds_per_image": sample_seconds / max(1, len(labels)),
    }
    try:
        test = build_dataset(cfg.data.dataset, root=cfg.data.root, split="test",
                             image_size=cfg.data.image_size, channels=cfg.data.channels)
        trn_x, trn_y = train.batch(torch.arange(len(train)))
        tst_x, tst_y = test.batch(torch.arange(len(test)))
        clf = fit_reference_classifier(trn_x, trn_y, tst_x, tst_y, seed=cfg.train.seed)
        metrics["class_accuracy"] = clf.accuracy(saved, gen.labels)
        metrics["classifier"] = "RBF-SVM on real train pixels"
        metrics["classifier_test_accuracy"] = clf.test_accuracy
    except Exception as exc:  # a dataset without a test split still gets its samples
        metrics["class_accuracy"] = None
        metrics["classifier_error"] = str(exc)
    metrics.update(extra or {})
    write_json(run_dir / "metrics.json", metrics)
    return metrics
