"""Whole-file writes that a crash cannot tear: the old file or the new one, never a mix.

The full sequence: write a temp file beside the target, fsync it, rename it over the target, fsync the
directory. Without the first fsync a power cut after the rename can leave an empty file; without the
last one it can leave the old name pointing at the old file (the rename itself not yet on disk).
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temp_path)` on a temp file beside `path`, then put it in place durably (see above).

    The new file keeps the permissions of the file it replaces; a new file gets the default mode the
    umask gives (not the 0600 of a private temp file). The temp file never outlives a failure, and
    `path` is untouched when `write` raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = _create_temp(path)
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _create_temp(path: Path) -> Path:
    # os.open with 0o666 lets the kernel apply the umask, as for any new file; mkstemp would force 0600.
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temp file beside {path}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # read-only is enough for fsync, and works on a 0444 file
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory; the rename is then as safe as they allow
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_stale_temps(path: str | Path, older_than_s: float = 60.0) -> int:
    """Remove the temp files atomic_write left beside `path` when a kill stopped it mid-write. Only files
    older than `older_than_s` go: a younger one may belong to a write still under way. Returns how many."""
    path = Path(path)
    if not path.parent.is_dir():
        return 0
    cutoff, removed = time.time() - older_than_s, 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass  # another process removed it first
    return removed
