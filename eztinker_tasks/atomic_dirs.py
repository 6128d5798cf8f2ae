"""Atomic directory writes: build a directory beside its final place, then publish it whole.

``write_atomically`` fills a temp dir, fsyncs it, and renames it into place (swapped with an
existing directory of that name by ``renameat2(RENAME_EXCHANGE)`` where the kernel has it), so a
crash never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from eztinker_tasks.catalog import file_lock


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final: Path, fill: Callable[[Path], None]) -> None:
    """Build ``final`` with ``fill(tmp)`` in a temp dir beside it, then publish it atomically."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with file_lock(parent / f".{final.name}.lock"):
        tmp = parent / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            fill(tmp)
            for child in tmp.iterdir():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
            _fsync_dir(tmp)
            if not final.exists():
                os.rename(tmp, final)
            elif _exchange(tmp, final):
                shutil.rmtree(tmp)  # tmp now holds the previous checkpoint
            else:
                old = parent / f".old-{final.name}-{uuid.uuid4().hex[:12]}"
                os.rename(final, old)
                os.rename(tmp, final)
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(parent)
