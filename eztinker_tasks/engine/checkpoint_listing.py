"""Listing and deleting checkpoints on disk (``checkpoints_dir/<run_id>/<name>/``).

Directories whose name starts with a dot (temp dirs, ``.snapshots``) are never listed; a
directory without a complete checkpoint is skipped. Deleting renames the checkpoint away first,
so it vanishes atomically.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from eztinker_tasks import checkpoint_paths
from eztinker_tasks.catalog import file_lock
from eztinker_tasks.engine.checkpoints import info_from_dir, resolve_existing
from eztinker_tasks.errors import CheckpointNotFound, InvalidRequest
from eztinker_tasks.types import CheckpointInfo


def list_all(checkpoints_dir: Path, run_id: str | None = None) -> list[CheckpointInfo]:
    root = Path(checkpoints_dir)
    if run_id is not None:
        checkpoint_paths.validate_name(run_id, "run_id")
        run_dirs = [root / run_id]
    else:
        run_dirs = sorted(root.iterdir()) if root.is_dir() else []
    infos = []
    for run_dir in run_dirs:
        if run_dir.name.startswith(".") or not run_dir.is_dir():
            continue
        for directory in sorted(run_dir.iterdir()):
            if directory.name.startswith(".") or not directory.is_dir():
                continue
            try:
                infos.append(info_from_dir(directory))
            except (CheckpointNotFound, InvalidRequest, ValueError, KeyError):
                continue  # not a complete checkpoint
    return sorted(infos, key=lambda info: (info.created_at, info.path))


def delete(checkpoints_dir: Path, path: str) -> Path:
    """Remove checkpoint ``path`` (renamed away first, so it vanishes atomically)."""
    directory, _ = resolve_existing(checkpoints_dir, path)
    with file_lock(directory.parent / f".{directory.name}.lock"):
        doomed = directory.parent / f".del-{directory.name}-{uuid.uuid4().hex[:12]}"
        os.rename(directory, doomed)
        shutil.rmtree(doomed)
    return directory
