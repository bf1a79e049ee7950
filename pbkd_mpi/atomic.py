"""Files that appear whole or not at all: written under a temporary name next to the
target, synced to disk, then renamed over it.

A reader (a resumed run, another rank) sees the old file or the new one, never a part of
one: a kill mid-write leaves only the temporary file, which the writer removes when it
fails and `stale_temporaries` finds after a kill. The syncs make the rename survive a node
crash too: without them a file system may persist the rename before the data, and a
resumed run would find a whole-looking file full of zeros.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """Hidden, per process, with the target's suffix (np.savez and Keras' save look at it).
    The leading dot keeps it out of globs for finished files, which use `[!.]*`."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def stale_temporaries(path: Path):
    """Temporary files of `path` left by writers that were killed."""
    return path.parent.glob(f".{path.stem}.tmp*{path.suffix}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield the temporary path to write; when the block ends without an error, the file
    replaces `path` atomically and durably. On an error it is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path):
    """Yield a temporary directory to fill; when the block ends without an error it takes
    the place of `path` (an earlier one is renamed aside first and then removed: a
    directory cannot be renamed over a full one). A reader sees the old directory, the
    new one or none, never a part of one. On an error the temporary one is removed."""
    path = Path(path)
    tmp, old = temporary_name(path), path.with_name(f".{path.name}.old{os.getpid()}")
    try:
        yield tmp
        for file in (f for f in tmp.rglob("*") if f.is_file()):
            _fsync(file)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
