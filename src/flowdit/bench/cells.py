"""Resumable benchmark results: finished cells saved as they finish, reused by a rerun.

Two stores with one rule -- a cell is reused only when its key *and* the whole setting
it was measured under (model checksum, sampler, precision, sample count, ...) match:

* :class:`Cells`: one file per cell, ``<dir>/<key hash>.pt``, holding tensors (images) and
  numbers; each file written atomically, so it is whole or absent.
* :class:`JsonlCells`: one JSON line per cell appended to a ``.jsonl`` file that several
  processes may share (one per guidance scale, say); a torn last line is skipped.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Hashable

import torch

from flowdit.utils.files import atomic_write

__all__ = ["Cells", "JsonlCells"]


class Cells:
    """Finished measurements of one benchmark, saved so that a killed run resumes.

    One file per measurement and seed, ``<dir>/<key hash>.pt``, holding its timings, counts
    and images; written to a temporary name and renamed, so a file is whole or absent.
    The key is the measurement's own name (with the seed) plus ``setting`` (model checksum,
    sampler, guidance, precision, sample count, batch size), so a changed setting never
    reuses a cell, while a run with more seeds reuses the seeds it shares.
    """

    def __init__(self, directory: Path, setting: dict, fresh: bool = False):
        self.dir, self.setting = directory, setting
        self.reused: list[str] = []
        if fresh and directory.is_dir():
            for f in directory.glob("*.pt"):
                f.unlink()

    def _path(self, name: str) -> Path:
        key = json.dumps({"name": name, **self.setting}, sort_keys=True)
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"

    def get(self, name: str) -> dict | None:
        """The saved row of cell ``name`` under this setting, or None (missing, damaged, other setting)."""
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            rec = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged cell is measured again, not trusted
            print(f"ignoring unreadable cell {path}: {e}", file=sys.stderr, flush=True)
            return None
        if rec.get("name") != name or rec.get("setting") != self.setting:
            return None
        self.reused.append(name)
        return rec["row"]

    def put(self, name: str, row: dict) -> None:
        """Save the row of cell ``name`` (tensors and plain values), atomically."""
        record = {"name": name, "setting": self.setting, "row": row}
        atomic_write(self._path(name), lambda f: torch.save(record, f))


class JsonlCells:
    """Finished cells as JSON lines ``{**record, "setting": setting}`` in one file.

    ``key(record)`` names a cell (e.g. ``(solver, steps, cfg, tol)``); the lines of other
    settings are kept (another process's share of the grid) but not reused. ``fresh``
    deletes the file first.
    """

    def __init__(self, path: Path, setting: dict, key: Callable[[dict], Hashable], fresh: bool = False):
        self.path, self.setting, self.key = Path(path), setting, key
        self.done: dict[Hashable, dict] = {}
        if self.path.exists() and fresh:
            self.path.unlink()
        elif self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the line a killed run was writing
                    continue
                if rec.pop("setting", None) == setting:
                    self.done[key(rec)] = rec

    def get(self, key: Hashable) -> dict | None:
        """The finished record of ``key`` under this setting, or None."""
        return self.done.get(key)

    def put(self, record: dict) -> None:
        """Append a finished record (one line, so concurrent writers interleave whole lines)."""
        with open(self.path, "a") as f:
            f.write(json.dumps({**record, "setting": self.setting}) + "\n")
        self.done[self.key(record)] = record

    def __len__(self) -> int:
        return len(self.done)


