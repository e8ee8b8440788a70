"""Reading flowdit checkpoints: find the newest complete one, verify and load it.

One checkpoint is a directory ``<run_dir>/checkpoints/step_0000123/`` holding
``<name>.safetensors`` per tensor group (``model``, ``ema``, ...), ``trainer_state.pt``
(read with ``torch.load(..., weights_only=True)`` only) and ``manifest.json`` (format
version, step, SHA-256 and size of every file, a free JSON ``meta`` dict);
``checkpoints/latest`` names the newest. Writing them belongs to training
(``flowdit.train.checkpoint``, which re-exports everything here); reading sits below
every layer that loads a model (``flowdit.inference``, the benchmarks), so that none of
them depends on the trainer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file

from flowdit.errors import CheckpointError

__all__ = [
    "CHECKPOINTS",
    "CORRUPT_PREFIX",
    "Checkpoint",
    "FORMAT_VERSION",
    "LATEST",
    "MANIFEST",
    "TRAINER_STATE",
    "checkpoint_candidates",
    "latest_checkpoint",
    "load_checkpoint",
    "load_state_dict_strict",
    "nonfinite_tensors",
    "resolve_checkpoint",
    "tensors_checksum",
    "verify_checkpoint",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
CHECKPOINTS = "checkpoints"

_STEP_DIR = re.compile(r"^step_(\d+)$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A checkpoint that failed verification is renamed, not deleted: neither a step directory
# nor hidden, so it is never loaded, pruned or cleaned up.
CORRUPT_PREFIX = "corrupt-"
_MANIFEST_KEYS = {"format", "format_version", "step", "tensor_groups", "files", "meta"}
_CHUNK = 1 << 20

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint.

    ``tensors`` maps a group name (``"model"``, ``"ema"``, ...) to its state dict;
    ``trainer_state`` is ``None`` when loaded with ``load_tensors_only=True``.
    """

    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    trainer_state: dict[str, Any] | None
    meta: dict[str, Any]
    path: Path


def nonfinite_tensors(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """``"group/key"`` of every floating-point tensor that holds a NaN or an infinity."""
    out = []
    for group, sd in groups.items():
        for key, t in sd.items():
            if t.is_floating_point() or t.is_complex():
                if not bool(torch.isfinite(t).all()):
                    out.append(f"{group}/{key}")
    return out


# --------------------------------------------------------------------------- finding


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` for every ``step_N`` directory in ``root``, complete or not."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return out


def _checkpoints_root(path: Path) -> Path:
    """The ``checkpoints`` directory for a run directory or a ``checkpoints`` directory."""
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS
    return path


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Return the newest complete checkpoint directory of a run, or ``None`` if it has none.

    ``run_dir`` may also be the ``checkpoints`` directory itself. ``checkpoints/latest``
    is trusted when it names an existing directory with a manifest; otherwise the highest
    ``step_N`` directory that has a manifest is used. Hidden temporary directories left
    by a crash are never considered.
    """
    root = _checkpoints_root(Path(run_dir))
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _STEP_DIR.match(name) and (root / name / MANIFEST).is_file():
            return root / name
        log.warning("%s names %r, which is not a complete checkpoint; scanning", latest, name)
    complete = [(s, p) for s, p in _step_dirs(root) if (p / MANIFEST).is_file()]
    if not complete:
        return None
    return max(complete, key=lambda sp: sp[0])[1]


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Every ``step_N`` directory of a run, newest first (complete or not)."""
    root = _checkpoints_root(Path(run_dir))
    return [p for _, p in sorted(_step_dirs(root), key=lambda sp: sp[0], reverse=True)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory that ``path`` (a checkpoint, run or ``checkpoints``
    directory) stands for, as :func:`load_checkpoint` reads it; nothing is loaded."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint, run or checkpoints directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if _STEP_DIR.match(path.name):
        raise CheckpointError(f"{path / MANIFEST}: missing (incomplete checkpoint?)")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint found")
    return found


def tensors_checksum(path: str | os.PathLike, group: str = "ema") -> str:
    """SHA-256 of one tensor group's file (``"ema"``, ``"model"``) of the checkpoint that
    ``path`` stands for, as its manifest records it; nothing is loaded or hashed again.
    Results keyed by it are never reused for other weights."""
    ckpt = resolve_checkpoint(path)
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    name = f"{group}.safetensors"
    if name not in files:
        raise CheckpointError(f"{ckpt / MANIFEST}: no {name} listed")
    return files[name]["sha256"]


# --------------------------------------------------------------------------- loading


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device | None = "cpu",
    verify: bool = True,
    load_tensors_only: bool = False,
) -> Checkpoint:
    """Load a checkpoint from a checkpoint, run, or ``checkpoints`` directory.

    Every file listed in the manifest must exist with the recorded size; with
    ``verify=True`` its SHA-256 is checked too. Any problem raises
    :class:`CheckpointError` naming the file. ``trainer_state.pt`` is read with
    ``torch.load(weights_only=True)`` only, and skipped when ``load_tensors_only``.
    """
    ckpt = resolve_checkpoint(path)
    manifest = _read_manifest(ckpt / MANIFEST)
    for fname, entry in manifest["files"].items():
        _check_file(ckpt / fname, entry, verify)

    device = "cpu" if map_location is None else str(map_location)
    tensors = {}
    for group in manifest["tensor_groups"]:
        fpath = ckpt / f"{group}.safetensors"
        try:
            tensors[group] = load_file(str(fpath), device=device)
        except Exception as e:  # safetensors raises its own error types and OSError
            raise CheckpointError(f"{fpath}: unreadable safetensors file ({_one_line(e)})") from None

    state = None
    if not load_tensors_only:
        fpath = ckpt / TRAINER_STATE
        try:
            state = torch.load(fpath, map_location=map_location, weights_only=True)
        except Exception as e:  # UnpicklingError for refused objects, RuntimeError for corrupt zips
            found = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
            if found:  # weights_only met a reference to a callable: the file carries code
                raise CheckpointError(
                    f"{fpath}: this file contains code (a reference to {found.group(1)}), refused; a flowdit "
                    "trainer state holds only tensors and plain values"
                ) from None
            raise CheckpointError(f"{fpath}: unreadable trainer state ({_one_line(e)})") from None
    return Checkpoint(
        step=manifest["step"], tensors=tensors, trainer_state=state,
        meta=manifest["meta"], path=ckpt,
    )


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check one checkpoint directory without loading it: its manifest, then every listed
    file's size and SHA-256. Returns the manifest; any problem raises
    :class:`CheckpointError` naming the file."""
    path = Path(path)
    manifest = _read_manifest(path / MANIFEST)
    for fname, entry in manifest["files"].items():
        _check_file(path / fname, entry, True)
    return manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({_one_line(e)})") from None
    if not isinstance(m, dict) or m.get("format") != "flowdit-checkpoint":
        raise CheckpointError(f"{path}: not a flowdit checkpoint manifest")
    version = m.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise CheckpointError(
            f"{path}: format version {version!r} is "
            + ("newer than" if newer else "not")
            + f" the one this flowdit reads ({FORMAT_VERSION})"
        )
    unknown = sorted(set(m) - _MANIFEST_KEYS)
    if unknown:
        raise CheckpointError(
            f"{path}: unknown manifest key {unknown[0]!r} (a flowdit checkpoint manifest holds "
            f"{', '.join(sorted(_MANIFEST_KEYS))}); written by another program or version?"
        )
    files = m.get("files")
    groups = m.get("tensor_groups")
    ok = (
        isinstance(m.get("step"), int)
        and isinstance(files, dict)
        and all(isinstance(e, dict) and {"sha256", "bytes"} <= e.keys() for e in files.values())
        and isinstance(groups, list)
        and all(isinstance(g, str) and _GROUP_NAME.match(g) for g in groups)
        and all(f"{g}.safetensors" in files for g in groups)
        and all(_GROUP_NAME.match(f) for f in files)
        and TRAINER_STATE in files
        and isinstance(m.get("meta", {}), dict)
    )
    if not ok:
        raise CheckpointError(f"{path}: malformed manifest (missing or bad step/files/tensor_groups)")
    m.setdefault("meta", {})
    return m


def _check_file(path: Path, entry: Mapping[str, Any], verify: bool) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (listed in {MANIFEST})") from None
    if size != entry["bytes"]:
        raise CheckpointError(
            f"{path}: size {size} != {entry['bytes']} in {MANIFEST} (truncated?)"
            if size < entry["bytes"]
            else f"{path}: size {size} != {entry['bytes']} in {MANIFEST}"
        )
    if verify:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 checksum mismatch with {MANIFEST} (corrupt file)")


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    # torch's weights_only message puts the useful reason after a long preamble.
    for ln in lines:
        if ln.startswith("WeightsUnpickler error"):
            # Drop torch's advice to allowlist the class: we never load foreign objects.
            text = ln.split(" Please use", 1)[0]
            break
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------- modules


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model"
) -> None:
    """Load ``state_dict`` into ``module``, requiring the same keys and shapes.

    On a mismatch raises one :class:`CheckpointError` that lists (the first few) missing
    keys, unexpected keys and shape mismatches, instead of torch's long multi-line error.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {list(state_dict[k].shape)} in checkpoint vs {list(v.shape)} in {what}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = [
        _listing("missing keys", missing),
        _listing("unexpected keys", unexpected),
        _listing("shape mismatches", shapes),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{what}: state dict does not match: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def _listing(label: str, items: list[str], show: int = 5) -> str:
    if not items:
        return ""
    more = f", ... (+{len(items) - show} more)" if len(items) > show else ""
    return f"{len(items)} {label}: " + ", ".join(items[:show]) + more
