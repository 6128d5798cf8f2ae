"""Extracting a downloaded checkpoint archive (tar.gz) without trusting its contents.

Only regular files and directories are written; absolute names, ``..`` components, links and
device files are refused before anything is extracted, so an archive can never write outside
the destination directory.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO

from eztinker.errors import EZTinkerError


class UnsafeArchiveError(EZTinkerError):
    """The archive holds an entry that could escape the destination (or is not a plain file)."""


def _check_member(member: tarfile.TarInfo, dest: Path) -> Path:
    name = member.name
    parts = PurePosixPath(name).parts
    if (
        not name
        or name.startswith(("/", "\\"))
        or ".." in parts
        or ":" in (parts[0] if parts else "")
    ):
        raise UnsafeArchiveError(f"refusing archive entry {name!r}: unsafe path")
    if "\\" in name:
        raise UnsafeArchiveError(f"refusing archive entry {name!r}: backslash in path")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"refusing archive entry {name!r}: not a regular file")
    target = (dest / name).resolve()
    if target != dest and dest not in target.parents:
        raise UnsafeArchiveError(f"refusing archive entry {name!r}: escapes {dest}")
    return target


def safe_extract(fileobj: IO[bytes], dest: str | Path) -> list[Path]:
    """Extract a gzipped tar into ``dest``; return the top-level paths it created."""
    root = Path(dest).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=fileobj, mode="r:gz") as tar:
        members = tar.getmembers()
        targets = [_check_member(m, root) for m in members]  # check everything first
        for member, target in zip(members, targets, strict=True):
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                continue
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            target.chmod(0o644)
    tops = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
    return sorted(root / top for top in tops)
