"""Checkpoints: safetensors weights plus a pickle-free trainer state, atomic and verified.

One checkpoint is a directory ``<run_dir>/checkpoints/step_0000123/`` holding

- ``<name>.safetensors`` for each named tensor group (``model``, ``ema``, ...),
- ``trainer_state.pt``: optimizer state, step, RNG states, ... restricted to what
  ``torch.load(..., weights_only=True)`` accepts, so loading never runs foreign code,
- ``manifest.json``: format version, step, SHA-256 and size of every file above, and a
  free JSON ``meta`` dict (resolved config, model config, ...).

A checkpoint is written into a hidden temporary directory next to the others and renamed
into place only when complete; ``checkpoints/latest`` names the newest one and is itself
replaced atomically. A crash at any moment therefore leaves the previous checkpoint (and a
``latest`` that names it) intact. One process writes to a run directory at a time (the
trainer holds :class:`flowdit.utils.files.DirLock` on it).

Only finite weights are saved: a tensor group holding NaN or infinity is refused before a
byte is written, so a checkpoint never preserves a diverged model.

Reading checkpoints lives in :mod:`flowdit.checkpoint_io` (re-exported here), so that
loading a model never needs the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from flowdit.checkpoint_io import (  # noqa: F401  (the reading side, re-exported)
    _GROUP_NAME,
    CHECKPOINTS,
    CORRUPT_PREFIX,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    TRAINER_STATE,
    Checkpoint,
    _CHUNK,
    _step_dirs,
    checkpoint_candidates,
    latest_checkpoint,
    load_checkpoint,
    load_state_dict_strict,
    nonfinite_tensors,
    resolve_checkpoint,
    tensors_checksum,
    verify_checkpoint,
)
from flowdit.errors import CheckpointError, ConfigError
from flowdit.utils.files import atomic_write_text

__all__ = [
    "Checkpoint",
    "FORMAT_VERSION",
    "CORRUPT_PREFIX",
    "checkpoint_candidates",
    "latest_checkpoint",
    "move_aside",
    "nonfinite_tensors",
    "load_checkpoint",
    "load_state_dict_strict",
    "resolve_checkpoint",
    "save_checkpoint",
    "tensors_checksum",
    "verify_checkpoint",
]

# Hidden names (leading dot) are never mistaken for checkpoints by the directory scan.
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    trainer_state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    keep_last: int | None = 3,
    protect_after: int | None = None,
) -> Path:
    """Write a checkpoint for ``step`` under ``<run_dir>/checkpoints/`` and return its path.

    ``tensors`` maps group names to state dicts, each saved as ``<name>.safetensors``
    (contiguous CPU copies). ``trainer_state`` may only hold tensors, numbers, strings,
    bytes, ``None``, lists, tuples and dicts (plus torch dtypes, devices and sizes);
    anything else raises :class:`CheckpointError` before a byte is written. ``meta`` must
    be JSON-serialisable. Every tensor must be finite: a NaN or infinity raises
    :class:`CheckpointError` naming it, and nothing is written. After the new checkpoint
    and ``latest`` are in place, all but the ``keep_last`` highest steps are removed (never
    the one just written, nor any step above ``protect_after``: a run resumed from an older
    checkpoint does not delete the newer ones; ``None`` keeps everything).
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ConfigError(f"keep_last must be a positive int or None, got {keep_last!r}")
    groups = _cpu_groups(tensors)
    bad = nonfinite_tensors(groups)
    if bad:
        raise CheckpointError(
            f"step {step}: refusing to save non-finite weights ({len(bad)} tensors hold NaN or inf, "
            f"first {bad[0]})"
        )
    state = {} if trainer_state is None else dict(trainer_state)
    _check_trainer_state(state, "trainer_state")
    meta = {} if meta is None else dict(meta)
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"meta is not JSON-serialisable: {e}") from None

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        files = {}
        for group, sd in groups.items():
            fname = f"{group}.safetensors"
            save_file(sd, str(tmp / fname))
            files[fname] = _sync_and_hash(tmp / fname)
        torch.save(state, tmp / TRAINER_STATE)
        files[TRAINER_STATE] = _sync_and_hash(tmp / TRAINER_STATE)
        manifest = {
            "format": "flowdit-checkpoint",
            "format_version": FORMAT_VERSION,
            "step": step,
            "tensor_groups": list(groups),
            "files": files,
            "meta": meta,
        }
        # The manifest goes last: a directory with a manifest is a complete checkpoint.
        _write_text_synced(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp)

        if final.exists():
            # A non-empty directory cannot be replaced in one rename, so move it aside first.
            trash = Path(tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{name}-", dir=root))
            os.replace(final, trash / name)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _write_latest(root, name)
    _prune(root, keep=keep_last, current=name, protect_after=protect_after)
    return final




def _cpu_groups(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict]:
    """Check group names and values; return contiguous CPU clones (no shared storage)."""
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"tensors must be a dict of state dicts, got {type(tensors).__name__}")
    out = {}
    for group, sd in tensors.items():
        if not isinstance(group, str) or not _GROUP_NAME.match(group):
            raise CheckpointError(f"bad tensor group name {group!r} (letters, digits, _ . - only)")
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"tensors[{group!r}] must be a state dict, got {type(sd).__name__}")
        cpu = {}
        for key, t in sd.items():
            if not isinstance(key, str):
                raise CheckpointError(f"tensors[{group!r}]: key {key!r} is not a string")
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(
                    f"tensors[{group!r}][{key!r}]: expected a tensor, got {type(t).__name__}"
                )
            # Cloning also breaks storage sharing (tied weights), which safetensors refuses.
            cpu[key] = t.detach().to("cpu", copy=True).contiguous()
        out[group] = cpu
    return out


_ATOMS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)


def _check_trainer_state(obj: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would refuse, naming where it is."""
    if type(obj) in _ATOMS:
        return
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(
                f"{where}: tensor subclass {type(obj).__name__} is not allowed in trainer state"
            )
        return
    if type(obj) in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            _check_trainer_state(v, f"{where}[{i}]")
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool, type(None)):
                raise CheckpointError(f"{where}: key {k!r} of type {type(k).__name__} is not allowed")
            _check_trainer_state(v, f"{where}[{k!r}]")
        return
    raise CheckpointError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not allowed in trainer "
        "state (only tensors, numbers, strings, lists, tuples, dicts; convert arrays to tensors)"
    )


def _sync_and_hash(path: Path) -> dict[str, Any]:
    """fsync ``path`` and return its SHA-256 and size for the manifest."""
    h = hashlib.sha256()
    size = 0
    with open(path, "r+b") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "bytes": size}


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes renames inside `path` durable; directories cannot be opened on Windows.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_latest(root: Path, name: str) -> None:
    # The temporary file carries _TMP_PREFIX, so that _prune removes what a crash leaves.
    atomic_write_text(root / LATEST, name + "\n", fsync=True, tmp_prefix=_TMP_PREFIX)
    _fsync_dir(root)


def _prune(root: Path, keep: int | None, current: str, protect_after: int | None = None) -> None:
    """Delete checkpoints beyond the ``keep`` highest steps (never one above
    ``protect_after``), and leftovers of crashes."""
    for p in root.iterdir():
        # Leftovers of an interrupted save or prune; safe because one process writes a run.
        if p.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    if keep is None:
        return
    steps = sorted(_step_dirs(root), key=lambda sp: sp[0], reverse=True)
    for step, p in steps[keep:]:
        if p.name == current or (protect_after is not None and step > protect_after):
            continue
        # Rename first, so a half-deleted directory never looks like a checkpoint.
        trash = root / f"{_TRASH_PREFIX}{p.name}"
        try:
            os.replace(p, trash)
        except OSError as e:
            log.warning("could not remove old checkpoint %s: %s", p, e)
            continue
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- finding


def move_aside(path: str | os.PathLike) -> Path:
    """Rename a checkpoint that failed verification to ``corrupt-step_N`` (numbered if
    that exists) next to it, so it is kept for inspection but never loaded or pruned;
    ``latest`` is pointed at the newest remaining complete checkpoint."""
    path = Path(path)
    root = path.parent
    target = root / f"{CORRUPT_PREFIX}{path.name}"
    n = 1
    while target.exists():
        n += 1
        target = root / f"{CORRUPT_PREFIX}{path.name}.{n}"
    os.replace(path, target)
    complete = [(s, p) for s, p in _step_dirs(root) if (p / MANIFEST).is_file()]
    if complete:
        _write_latest(root, max(complete, key=lambda sp: sp[0])[1].name)
    else:
        (root / LATEST).unlink(missing_ok=True)
    _fsync_dir(root)
    return target
