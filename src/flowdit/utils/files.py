"""Files written safely and checked: atomic writes, SHA-256 digests, output locations
checked before any work, and an exclusive lock on a directory."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import tempfile
from pathlib import Path
from typing import IO, Callable

from flowdit.errors import ConfigError, FlowditError

try:  # POSIX; elsewhere DirLock is a no-op
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["DirLock", "DirLocked", "atomic_write", "atomic_write_text", "check_writable", "finite_or_none",
           "sha256_file", "write_json"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, fsync: bool = False,
                 tmp_prefix: str = ".") -> Path:
    """Write ``path`` through ``write(file)`` so that it appears whole or not at all.

    The bytes go to a temporary file beside ``path`` (``<tmp_prefix><name>.<pid>.<random>.tmp``,
    hidden by default), which is then renamed over ``path``. ``fsync`` flushes the file to
    disk before the rename, for files whose loss after a power cut would matter (configs,
    ``checkpoints/latest``); the caller syncs the directory when the rename itself must
    survive one. ``tmp_prefix`` lets a directory's owner recognise and clean up the
    leftovers of a crash. Returns ``path`` as a :class:`Path`.
    """
    # Write beside the target then rename, so a crash or a reader never sees half a file.
    # (Not tempfile.mkstemp: its 0600 mode would survive the rename.)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{tmp_prefix}{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False, tmp_prefix: str = ".") -> Path:
    """:func:`atomic_write` of ``text`` encoded as UTF-8."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), fsync=fsync, tmp_prefix=tmp_prefix)


def finite_or_none(obj):
    """``obj`` with every non-finite float replaced by ``None``, so that it is valid JSON
    (``json.dumps`` would write ``NaN`` / ``Infinity``, which JSON does not have)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as strict, indented JSON (a non-finite float becomes ``null``), atomically."""
    return atomic_write_text(path, json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work, an output ``path`` that could not be written later.

    The nearest existing ancestor of ``path`` (``path`` itself when it is an existing
    directory) must be a directory in which a file can be created: that is probed with an
    anonymous temporary file, so the check holds for read-only file systems and for root
    too, and leaves nothing behind. Missing folders below it are fine (they are created
    when the output is written). ``what`` names the flag or key in the message
    (``"--out"``, ``"out_dir"``). Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        if probe.is_symlink():  # a dangling link cannot be created through
            raise ConfigError(f"{what} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what} {path}: {probe} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write in {probe} ({e.strerror or e})") from None
    return path


class DirLocked(FlowditError):
    """Another process holds the lock on a directory."""


# real path of a locked directory -> [fd, holders in this process, whether acquire created it]
_HELD: dict[str, list] = {}


def _lock_holder(fd: int) -> str:
    """The pid that holds a flock on the file open as ``fd``, from Linux's /proc/locks
    (empty where that is not available)."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(st.st_ino):
                    return parts[4]
    except OSError:
        pass
    return ""


class DirLock:
    """An exclusive advisory lock on a directory: ``fcntl.flock`` on ``<dir>/.lock``.

    The operating system drops the lock when the holding process exits, however it exits
    (``kill -9`` included), so a stale lock never blocks a later run, and the lock file's
    contents are never written. A second process that asks for it gets
    :class:`DirLocked` at once (no waiting). Within one process the lock is counted: a
    nested ``acquire`` of the same directory succeeds and the lock is dropped by the last
    ``release``. A directory that ``acquire`` created and that holds nothing but the lock
    file when the last hold is released (the work failed before writing) is removed
    again. Usable as a context manager.
    """

    NAME = ".lock"

    def __init__(self, directory: str | os.PathLike, what: str = "run directory"):
        self.directory = Path(directory)
        self.what = what
        self._key: str | None = None

    def acquire(self) -> "DirLock":
        if self._key is not None:
            return self
        key = os.path.realpath(self.directory)
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / self.NAME, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _lock_holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else ""
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                by = f" (pid {holder})" if holder else ""
                raise DirLocked(
                    f"{self.directory}: {self.what} is in use by another flowdit process{by}; wait for it to "
                    "finish or choose another name"
                ) from None
        _HELD[key] = [fd, 1, created]
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            if entry[2]:  # a directory made only to hold the lock (the work failed): leave no trace
                try:
                    if [p.name for p in self.directory.iterdir()] == [self.NAME]:
                        (self.directory / self.NAME).unlink()
                        self.directory.rmdir()
                except OSError:
                    pass
            if fcntl is not None:
                fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
