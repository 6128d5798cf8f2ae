"""Reading checkpoints from disk in the web process (torch-free).

Workers write checkpoints under ``CHECKPOINTS_DIR/<run_id>/<name>/`` with a small JSON metadata
file; the web process shares that directory and lists, streams and deletes from it directly.
``get_checkpoint`` (and so everything that reads, streams, deletes, loads or samples one
checkpoint) answers a checkpoint of another tenant's run as a missing one; lists are
filtered by ``tenancy.seen_checkpoints``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from config import Settings
from eztinker_tasks import checkpoint_paths
from eztinker_tasks.errors import CheckpointNotFound, InvalidRequest
from eztinker_tasks.types import CheckpointInfo
from eztinker_web import tenancy

META_FILES = ("eztinker_checkpoint.json", "eztinker_state.json", "eztinker_sampler.json")


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def read_info(directory: Path, run_id: str, name: str) -> CheckpointInfo | None:
    for meta_name in META_FILES:
        meta_path = directory / meta_name
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                return None
            return CheckpointInfo(
                run_id=run_id,
                name=name,
                kind=meta.get("kind", "state"),
                path=checkpoint_paths.format_path(run_id, name),
                directory=str(directory.resolve()),
                step=int(meta.get("step", 0)),
                base_model=str(meta.get("base_model", "")),
                created_at=float(meta.get("created_at", directory.stat().st_mtime)),
                size_bytes=_size(directory),
            )
    return None


def list_checkpoints(settings: Settings, run_id: str | None = None) -> list[CheckpointInfo]:
    root = Path(settings.checkpoints_dir)
    if not root.is_dir():
        return []
    run_dirs = [root / run_id] if run_id else sorted(p for p in root.iterdir() if p.is_dir())
    out = []
    for run_dir in run_dirs:
        if not run_dir.is_dir() or run_dir.name.startswith("."):
            continue
        for ckpt in sorted(run_dir.iterdir()):
            if ckpt.is_dir() and not ckpt.name.startswith("."):
                info = read_info(ckpt, run_dir.name, ckpt.name)
                if info is not None:
                    out.append(info)
    return sorted(out, key=lambda c: c.created_at)


def get_checkpoint(settings: Settings, path: str) -> CheckpointInfo:
    """The checkpoint at ``path``; CheckpointNotFound (404) if there is none or it belongs to
    a run the caller does not see (asked before the disk, so both read the same)."""
    directory = checkpoint_paths.resolve(settings.checkpoints_dir, path)
    tenancy.check_checkpoint(path)
    run_id, name = checkpoint_paths.parse_path(path)
    info = read_info(directory, run_id, name) if directory.is_dir() else None
    if info is None:
        raise CheckpointNotFound(f"no checkpoint {path!r}", errors={"path": ["not found"]})
    return info


def loadable_checkpoint(settings: Settings, path: str, optimizer: bool) -> CheckpointInfo:
    """``get_checkpoint``, refusing (400) to restore optimizer state from a sampler checkpoint."""
    info = get_checkpoint(settings, path)
    if optimizer and info.kind != "state":
        raise InvalidRequest(
            f"checkpoint {path!r} is a {info.kind} checkpoint: it holds weights only, no "
            "optimizer state; load it without the optimizer state",
            errors={"path": ["not a state checkpoint"], "optimizer": ["must be false"]},
        )
    return info


def delete_checkpoint(settings: Settings, path: str) -> CheckpointInfo:
    info = get_checkpoint(settings, path)
    directory = Path(info.directory)
    trash = directory.parent / f".deleted-{directory.name}-{time.time_ns()}"
    directory.rename(trash)  # atomic: the checkpoint disappears at once
    shutil.rmtree(trash, ignore_errors=True)
    return info
