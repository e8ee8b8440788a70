"""Train, ship, verify and load the per-data-set evaluator and guide networks.

Shipped weights live in ``flowdit/eval/weights/<dataset>_<kind>.safetensors``, listed in
``weights/manifest.json`` with their SHA-256, architecture, seed, test accuracy and the
command that regenerates them (``flowdit evaluator train --dataset <dataset>``, which
writes to ``./evaluators`` unless given ``--out-dir`` or, to replace the shipped files,
``--replace-shipped``). Loading verifies the checksum, so a corrupted or hand-edited file
is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from ..errors import CheckpointError, DataError
from ..utils.files import atomic_write, atomic_write_text, sha256_file
from .networks import NETWORKS

WEIGHTS_DIR = Path(__file__).parent / "weights"

# Each kind is trained with its own seed and data order: independent networks.
DEFAULT_SEEDS = {"evaluator": 1234, "guide": 98765}


def _translate(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random integer translations by up to ``max_shift`` pixels per image (background -1)."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])


@torch.no_grad()
def predict(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, F], logits [N, K])`` of ``images [N, C, H, W]`` in ``[-1, 1]``, in eval mode."""
    net.eval()
    feats, logits = [], []
    for lo in range(0, len(images), batch_size):
        x = images[lo:lo + batch_size].float()
        f = net.features(x)
        feats.append(f)
        logits.append(net.head(f))
    return torch.cat(feats), torch.cat(logits)


def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``net`` on labelled images."""
    _, logits = predict(net, images)
    return float((logits.argmax(1) == labels).float().mean())


def train_classifier(kind: str, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                     test_y: torch.Tensor, num_classes: int, epochs: int, seed: Optional[int] = None,
                     batch_size: int = 128, lr: float = 2e-3, max_shift: Optional[int] = None,
                     progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train an ``evaluator`` or ``guide`` network with Adam (one-cycle lr) and random
    translations (``max_shift`` pixels, default ``size // 14``); returns the network and a record of how it was made and how it scores.

    Args:
        train_x, test_x: ``[N, C, H, W]`` in ``[-1, 1]``; train_y, test_y: ``[N]`` labels.
    """
    if kind not in NETWORKS:
        raise DataError(f"unknown classifier kind {kind!r}; valid: {sorted(NETWORKS)}")
    seed = DEFAULT_SEEDS[kind] if seed is None else seed
    if max_shift is None:  # +-2 px on 28 px digits; none on 8 px ones, where a pixel is a stroke
        max_shift = train_x.shape[-1] // 14
    torch.manual_seed(seed)
    C, H = train_x.shape[1], train_x.shape[2]
    arch = {"in_channels": C, "image_size": H, "num_classes": num_classes}
    net = NETWORKS[kind](**arch)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = len(train_x)
    steps_per_epoch = -(-n // batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    t0 = time.perf_counter()
    bar = tqdm(total=total, disable=not progress, desc=f"train {kind}", dynamic_ncols=True)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=g)
        for lo in range(0, n, batch_size):
            idx = perm[lo:lo + batch_size]
            x = _translate(train_x[idx].float(), max_shift, g)
            loss = F.cross_entropy(net(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    record = {
        "kind": kind, "arch": arch, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "max_shift": max_shift, "train_size": n, "test_size": len(test_x),
        "test_accuracy": accuracy(net, test_x, test_y),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "params": sum(p.numel() for p in net.parameters()),
    }
    return net.eval(), record


def _manifest_path(weights_dir: Path) -> Path:
    return weights_dir / "manifest.json"


def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict:
    path = _manifest_path(weights_dir)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def save_classifier(net: torch.nn.Module, dataset: str, record: dict, weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Write ``<dataset>_<kind>.safetensors`` and its manifest entry (atomically)."""
    weights_dir.mkdir(parents=True, exist_ok=True)
    kind = record["kind"]
    path = weights_dir / f"{dataset}_{kind}.safetensors"
    blob = st_save({k: v.contiguous() for k, v in net.state_dict().items()})
    atomic_write(path, lambda f: f.write(blob))
    manifest = read_manifest(weights_dir)
    manifest[f"{dataset}/{kind}"] = dict(record, file=path.name, sha256=sha256_file(path), dataset=dataset,
                                         command=f"flowdit evaluator train --dataset {dataset} --kinds {kind} --epochs {record['epochs']}")
    atomic_write_text(_manifest_path(weights_dir), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def load_classifier(dataset: str, kind: str = "evaluator", weights_dir: Path = WEIGHTS_DIR) -> tuple[torch.nn.Module, dict]:
    """The shipped (or regenerated) ``kind`` network of ``dataset`` in eval mode, and its
    manifest record. The file's SHA-256 must match the manifest."""
    entry = read_manifest(weights_dir).get(f"{dataset}/{kind}")
    if entry is None:
        where = "--replace-shipped" if Path(weights_dir) == WEIGHTS_DIR else f"--out-dir {weights_dir}"
        raise DataError(
            f"no {kind} network for dataset {dataset!r} in {weights_dir}; "
            f"train one with: flowdit evaluator train --dataset {dataset} {where}"
        )
    path = weights_dir / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: listed in the manifest but missing")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 {digest[:12]}... does not match the manifest ({entry['sha256'][:12]}...)")
    net = NETWORKS[kind](**entry["arch"])
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    net.load_state_dict(state)
    return net.eval(), entry
