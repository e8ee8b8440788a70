"""A data set's latents on disk: sharded, checksummed, with the captions of every item.

A latent model trains on ``z = (E(x) - shift) * scale`` of a fixed set of images; encoding
them at every step would cost more than the transformer. So they are encoded once
(``flowdit autoencoder encode``) and stored as ``shard_00000.safetensors ...`` (float16
latents ``[n, c, h, w]`` and int64 labels ``[n]``, ``shard_size`` items each) next to an
``index.json`` that records each shard's SHA-256, the item count, the latent shape, the
autoencoder that made them and, for captioned data, every item's captions.

``index.json`` is written last (atomically), so a directory without it is an unfinished
cache and is refused; a shard whose bytes do not match its checksum is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from flowdit.errors import DataError
from flowdit.utils.files import atomic_write, atomic_write_text, sha256_file

__all__ = ["LatentDataset", "write_latent_cache", "load_latent_cache", "INDEX_NAME"]

INDEX_NAME = "index.json"
FORMAT = "flowdit-latents-1"


@dataclass(eq=False, repr=False)
class LatentDataset:
    """Latents held in memory, served like an :class:`~flowdit.data.base.ImageDataset`.

    Attributes:
        latents: float16 ``[N, c, h, w]`` (normalised: zero mean, unit variance over data).
        labels: int64 ``[N]``.
        captions: per item, its captions (empty lists for uncaptioned data).
        num_classes, class_names, name, split: as for an image data set.
        meta: what ``index.json`` records (the autoencoder, the source data set, ...).
    """

    latents: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    name: str = "latents"
    split: Optional[str] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.latents.dim() != 4 or self.labels.shape != (self.latents.shape[0],):
            raise DataError(f"{self.name}: latents [N, c, h, w] and labels [N] expected, got "
                            f"{tuple(self.latents.shape)} and {tuple(self.labels.shape)}")
        if self.captions and len(self.captions) != len(self):
            raise DataError(f"{self.name}: {len(self.captions)} caption lists for {len(self)} latents")
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(c, h, w)`` of one latent."""
        return tuple(self.latents.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, indices, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents float32 ``[B, c, h, w]`` and labels ``[B]`` of ``indices [B]``."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        z, y = self.latents[idx].float(), self.labels[idx]
        return (z, y) if device is None else (z.to(device), y.to(device))

    def __repr__(self) -> str:
        return f"LatentDataset(name={self.name!r}, n={len(self)}, shape={self.shape}, captioned={bool(self.captions)})"


def write_latent_cache(path: str | Path, latents: torch.Tensor, labels: torch.Tensor,
                       captions: Optional[Sequence[Sequence[str]]] = None, meta: Optional[dict] = None,
                       shard_size: int = 8192) -> Path:
    """Write ``latents [N, c, h, w]`` (stored as float16) and ``labels [N]`` as shards with
    checksums under ``path``; ``index.json`` last. Refuses a directory that already holds
    a cache and non-finite latents (nothing is written then)."""
    from safetensors.torch import save

    path = Path(path)
    if (path / INDEX_NAME).exists():
        raise DataError(f"{path}: already holds a latent cache ({INDEX_NAME}); choose another --out")
    if not bool(torch.isfinite(latents).all()):
        raise DataError(f"{path}: refusing to cache non-finite latents")
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    n = latents.shape[0]
    if captions is not None and len(captions) != n:
        raise DataError(f"{path}: {len(captions)} caption lists for {n} latents")
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, lo in enumerate(range(0, n, shard_size)):
        name = f"shard_{k:05d}.safetensors"
        blob = save({"latents": latents[lo:lo + shard_size].to(torch.float16).contiguous(),
                     "labels": labels[lo:lo + shard_size].to(torch.int64).contiguous()})
        atomic_write(path / name, lambda f, b=blob: f.write(b), fsync=True)
        shards.append({"file": name, "items": min(shard_size, n - lo), "sha256": sha256_file(path / name)})
    index = {"format": FORMAT, "items": n, "shape": list(latents.shape[1:]), "shards": shards,
             "captions": [list(c) for c in captions] if captions is not None else None, "meta": meta or {}}
    atomic_write_text(path / INDEX_NAME, json.dumps(index), fsync=True)
    return path


def load_latent_cache(path: str | Path, verify: bool = True) -> LatentDataset:
    """Read a cache written by :func:`write_latent_cache`, checking every shard's SHA-256
    (``verify``) and the item counts; refuses a damaged or unfinished one naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    index_path = path / INDEX_NAME
    if not index_path.is_file():
        raise DataError(f"{path}: no {INDEX_NAME}: not a latent cache, or one whose writing did not finish "
                        "(write it with flowdit autoencoder encode)")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{index_path}: unreadable ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{index_path}: not a {FORMAT} index")
    zs, ys = [], []
    for shard in index["shards"]:
        f = path / shard["file"]
        if not f.is_file():
            raise DataError(f"{f}: shard missing from the latent cache")
        if verify and sha256_file(f) != shard["sha256"]:
            raise DataError(f"{f}: checksum mismatch (the shard is damaged); re-encode the cache")
        try:
            t = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{f}: unreadable shard ({e})") from None
        if t["latents"].shape[0] != shard["items"] or t["labels"].shape[0] != shard["items"]:
            raise DataError(f"{f}: holds {t['latents'].shape[0]} items, the index says {shard['items']}")
        zs.append(t["latents"])
        ys.append(t["labels"])
    latents, labels = torch.cat(zs), torch.cat(ys)
    if latents.shape[0] != index["items"] or list(latents.shape[1:]) != index["shape"]:
        raise DataError(f"{path}: shards hold {tuple(latents.shape)}, the index says {index['items']} x {index['shape']}")
    meta = index.get("meta") or {}
    source = meta.get("data", {})
    return LatentDataset(latents, labels, int(source.get("num_classes", int(labels.max()) + 1 if len(labels) else 1)),
                         list(source.get("class_names", [])), index.get("captions") or [],
                         name=f"{source.get('name', 'latents')}-latents", split=source.get("split"), meta=meta)
