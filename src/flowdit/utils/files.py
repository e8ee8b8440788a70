"""Files written safely and checked: atomic writes and SHA-256 digests."""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import IO, Callable

__all__ = ["atomic_write", "sha256_file"]


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through ``write(file)`` so that it appears whole or not at all."""
    # Write beside the target then rename, so a crash or a reader never sees half a file.
    # (Not tempfile.mkstemp: its 0600 mode would survive the rename.)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
