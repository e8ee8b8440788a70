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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from flowdit.errors import CheckpointError, ConfigError

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

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
CHECKPOINTS = "checkpoints"

_STEP_DIR = re.compile(r"^step_(\d+)$")
_GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Hidden names (leading dot) are never mistaken for checkpoints by the directory scan.
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
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


def nonfinite_tensors(groups: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """``"group/key"`` of every floating-point tensor that holds a NaN or an infinity."""
    out = []
    for group, sd in groups.items():
        for key, t in sd.items():
            if t.is_floating_point() or t.is_complex():
                if not bool(torch.isfinite(t).all()):
                    out.append(f"{group}/{key}")
    return out


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
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{LATEST}-", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / LATEST)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
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


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` for every ``step_N`` directory in ``root``, complete or not."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return out


# --------------------------------------------------------------------------- finding


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
