"""Atomic file and folder writes: build under a temporary name beside the target, then rename into place.

A reader (or a crash) never sees half a file or half a folder. Temporary folders get the mode an ordinary
``mkdir`` would (``tempfile.mkdtemp`` makes them 0700, which would leak into the published folder).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` (created if needed), with the permissions of a plain ``mkdir``."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


_RENAME_EXCHANGE = 2  # renameat2(2) flag (Linux 3.15+): swap two paths in one step


def _exchange(a: Path, b: Path) -> bool:
    """Swap folders ``a`` and ``b`` atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where the
    system or the file system cannot (then the caller renames in two steps)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, musl)
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, target: Path) -> None:
    """Move the complete folder ``tmp`` to ``target``; an existing ``target`` is replaced only at the end.

    On Linux the two folders are swapped in one step, so ``target`` always exists: a reader or a crash sees the
    old folder or the new one. Elsewhere the old folder is first renamed aside (``.<name>.old-*``), which leaves
    a moment with no ``target``; a crash in that moment leaves the old folder whole under that name.
    """
    if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the previous folder
        return
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old, target)  # put the previous folder back rather than leave nothing in its place
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_file(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """Write a file atomically: ``write(tmp)`` fills a temporary sibling, which then replaces ``path``.

    ``durable``: also fsync the file before the rename and the folder after it, so the new file survives a
    power loss (index versions and ``LIVE``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if durable:
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so a rename into it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    write_file(path, lambda tmp: tmp.write_text(text))


def write_parquet(df, path: str | Path) -> None:
    """Write a polars DataFrame to Parquet atomically."""
    write_file(path, df.write_parquet)


def scratch_dir(path: str | Path, owner: str) -> Path:
    """An empty scratch folder at ``path`` for the tool ``owner`` (a benchmark), made anew on each call.

    A folder that is not empty is deleted only when a marker file says ``owner`` made it; any other is refused
    with ``SystemExit`` naming the path, so a mistyped ``--work`` never deletes somebody's files.
    """
    path = Path(path)
    marker = path / f".{owner}-scratch"
    if path.exists() and not path.is_dir():
        raise SystemExit(f"{owner}: {path} is a file, not a folder; choose a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        if not marker.is_file():
            raise SystemExit(f"{owner}: {path} is not empty and was not made by {owner}; choose a new or empty "
                             "folder")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"scratch folder of {owner}: deleted and made anew by each run\n")
    return path
