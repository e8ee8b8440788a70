"""Coupling data for reflow: ``(noise, sample, label)`` triples from a model's own ODE.

Reflow (Liu, Gong & Liu, "Flow Straight and Fast", ICLR 2023, sec. 2.2) retrains a flow on
the deterministic coupling ``(Z_1, Z_0)`` that a trained flow induces: ``Z_1`` the starting
noise (flowdit's t = 1) and ``Z_0 = ODE(Z_1)`` the sample it integrates to (t = 0).

Pairs are written to a directory as shards of ``shard_size`` consecutive indices, each a
safetensors file (``noise``, ``sample``: float32 ``[n, C, H, W]``; ``label``, ``index``:
int64 ``[n]``) with a JSON sidecar holding its SHA-256. The noise of index ``i`` is a
function of ``(seed, i)`` alone (:func:`flowdit.inference.indexed_noise`) and label
``i`` is ``i mod num_classes``, so the data set is the same whatever the shard size, the
number of processes or the number of interruptions. A shard is written atomically; a run
started again skips every shard whose file matches its sidecar, so nothing is duplicated
or dropped. Under ``torchrun`` rank ``r`` of ``W`` writes the shards ``s`` with
``s mod W == r``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..inference.generate import indexed_noise
from ..inference.velocity import model_velocity
from ..utils.files import atomic_write, sha256_file

__all__ = ["Pairs", "write_pairs", "load_pairs", "model_sampler"]

MANIFEST = "manifest.json"
SampleFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


@dataclass
class Pairs:
    """A coupling in memory: ``noise [N, ...]`` (t = 1), ``sample [N, ...]`` (t = 0) and
    ``label [N]`` (``None`` for an unconditional coupling), in index order."""

    noise: torch.Tensor
    sample: torch.Tensor
    label: Optional[torch.Tensor]
    settings: dict

    def __len__(self) -> int:
        return len(self.noise)


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _shard_done(out: Path, s: int) -> bool:
    """True when shard ``s`` and its sidecar exist and the file matches the recorded hash."""
    data, side = out / f"shard_{s:05d}.safetensors", out / f"shard_{s:05d}.json"
    if not (data.exists() and side.exists()):
        return False
    try:
        return json.loads(side.read_text())["sha256"] == sha256_file(data)
    except (json.JSONDecodeError, KeyError, OSError):
        return False


def write_pairs(
    out_dir: str | Path,
    num: int,
    shape: Sequence[int],
    sample_fn: SampleFn,
    num_classes: Optional[int],
    seed: int = 0,
    shard_size: int = 5000,
    settings: Optional[dict] = None,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 500,
    progress: bool = True,
) -> Path:
    """Generate ``num`` pairs into ``out_dir``; returns the manifest path (rank 0 writes it).

    Args:
        sample_fn: ``(noise [n, *shape], labels [n] or None) -> samples [n, *shape]``, the
            teacher's ODE from t = 1 to t = 0 (see :func:`model_sampler`).
        num_classes: labels are ``index mod num_classes``; ``None`` for no labels.
        settings: what produced the pairs (teacher, solver, NFE, guidance); recorded in the
            manifest, and a restart with other settings, seed, shape or count is refused.
        rank, world_size: this process's share of the shards.
    """
    if num <= 0 or shard_size <= 0 or batch_size <= 0:
        raise ConfigError(f"num, shard_size and batch_size must be positive, got {num}, {shard_size}, {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {"num": num, "shape": list(shape), "seed": seed, "shard_size": shard_size,
              "num_classes": num_classes, "settings": settings or {}}
    man = out / MANIFEST
    if man.exists():
        old = json.loads(man.read_text())
        if {k: old.get(k) for k in header} != header:
            diff = [k for k in header if old.get(k) != header[k]]
            raise ConfigError(f"{out} holds pairs made with other {', '.join(diff)}; use another --out")
    elif rank == 0:
        _write_text(man, json.dumps({**header, "complete": False}, indent=2) + "\n")

    n_shards = -(-num // shard_size)
    mine = [s for s in range(n_shards) if s % world_size == rank]
    todo = [s for s in mine if not _shard_done(out, s)]
    bar = tqdm(total=sum(min(num, (s + 1) * shard_size) - s * shard_size for s in todo), unit="pair",
               desc="pairs", disable=not progress, dynamic_ncols=True)
    for s in todo:
        lo, hi = s * shard_size, min(num, (s + 1) * shard_size)
        noises, samples = [], []
        for b in range(lo, hi, batch_size):
            idx = list(range(b, min(hi, b + batch_size)))
            z1 = indexed_noise(idx, shape, seed)
            labels = torch.tensor(idx) % num_classes if num_classes else None
            z0 = sample_fn(z1, labels)
            if z0.shape != z1.shape:
                raise ConfigError(f"sample_fn returned shape {tuple(z0.shape)} for noise {tuple(z1.shape)}")
            noises.append(z1)
            samples.append(z0.detach().float().cpu())
            bar.update(len(idx))
        index = torch.arange(lo, hi)
        tensors = {"noise": torch.cat(noises), "sample": torch.cat(samples), "index": index}
        if num_classes:
            tensors["label"] = index % num_classes
        data = out / f"shard_{s:05d}.safetensors"
        atomic_write(data, lambda f: f.write(st_save(tensors)))
        _write_text(out / f"shard_{s:05d}.json", json.dumps({"count": hi - lo, "sha256": sha256_file(data)}) + "\n")
    bar.close()

    if rank == 0 and all(_shard_done(out, s) for s in range(n_shards)):
        shards = {f"shard_{s:05d}.safetensors": json.loads((out / f"shard_{s:05d}.json").read_text())
                  for s in range(n_shards)}
        _write_text(man, json.dumps({**header, "complete": True, "shards": shards}, indent=2) + "\n")
    return man


def load_pairs(path: str | Path) -> Pairs:
    """Read a complete pair directory written by :func:`write_pairs`, verifying every shard."""
    out = Path(path)
    man = out / MANIFEST
    if not man.exists():
        raise DataError(f"{out}: no {MANIFEST}; not a pair directory")
    try:
        meta = json.loads(man.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{man}: not valid JSON ({e})") from None
    if not meta.get("complete"):
        raise DataError(f"{out}: pair generation is not complete; run it again with the same arguments to finish")
    parts = []
    for name, entry in sorted(meta["shards"].items()):
        f = out / name
        if not f.exists():
            raise DataError(f"{f}: missing shard")
        blob = f.read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise DataError(f"{f}: checksum mismatch (corrupt or changed shard)")
        parts.append(st_load(blob))
    index = torch.cat([p["index"] for p in parts])
    if not torch.equal(index, torch.arange(meta["num"])):
        raise DataError(f"{out}: shard indices do not cover 0..{meta['num'] - 1} exactly once")
    label = torch.cat([p["label"] for p in parts]) if meta.get("num_classes") else None
    return Pairs(torch.cat([p["noise"] for p in parts]), torch.cat([p["sample"] for p in parts]), label,
                 meta.get("settings", {}))


def model_sampler(model: torch.nn.Module, solver: str = "rf2", steps: int = 8, cfg_scale: float = 1.0,
                  amp_dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> SampleFn:
    """A :data:`SampleFn` that integrates a conditional flowdit model from noise to data,
    with classifier-free guidance folded into the coupling when ``cfg_scale != 1``
    (as InstaFlow folds text guidance into its pairs)."""

    from ..sampling.sample import sample

    device = torch.device(device)
    model.eval()

    def fn(noise: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        # Unlabelled pairs come from the null class, unguided.
        y = None if labels is None else labels.to(device)
        velocity = model_velocity(model, y, cfg_scale if labels is not None else 1.0, amp_dtype)
        return sample(velocity, noise.to(device), solver=solver, steps=steps).x.cpu()

    return fn
