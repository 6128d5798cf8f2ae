"""The unnamed sampler snapshots that ``save_weights_and_get_sampling_client`` makes.

Each call saves the run's live weights as ``<run_id>/snapshot-<hex>.sampler``. An RL loop
makes one per iteration, so only the newest ``EZTINKER_SAMPLER_SNAPSHOTS_KEPT`` of a run stay on
disk (the one being saved counts): older ones are deleted when a new one is asked for. A
sampling client on a deleted snapshot gets a clear 404 saying why (``check_kept``).
"""

from __future__ import annotations

import contextlib
import uuid

from eztinker_tasks import checkpoint_paths
from eztinker_tasks.errors import CheckpointNotFound
from eztinker_web.checkpoints.listing import delete_checkpoint, list_checkpoints
from eztinker_web.services import services
from eztinker_web.tinker_api.paths import SAMPLER_SUFFIX

PREFIX = "snapshot-"


def new_name() -> str:
    """A fresh snapshot checkpoint name, ``snapshot-<16 hex>.sampler``."""
    return f"{PREFIX}{uuid.uuid4().hex[:16]}{SAMPLER_SUFFIX}"


def is_snapshot(name: str) -> bool:
    return name.startswith(PREFIX) and name.endswith(SAMPLER_SUFFIX)


def prune(run_id: str) -> list[str]:
    """Delete the run's older snapshots so that, with the one being saved now, at most
    ``sampler_snapshots_kept`` remain; returns the deleted checkpoint paths (oldest first)."""
    settings = services().settings
    snaps = [c for c in list_checkpoints(settings, run_id) if is_snapshot(c.name)]  # by age
    extra = len(snaps) - (settings.sampler_snapshots_kept - 1)
    deleted = []
    for info in snaps[: max(0, extra)]:
        with contextlib.suppress(CheckpointNotFound):  # a concurrent prune took it
            delete_checkpoint(settings, info.path)
            deleted.append(info.path)
    return deleted


def check_kept(checkpoint: str) -> None:
    """Raise CheckpointNotFound (404) saying why if ``checkpoint`` is a snapshot that is no
    longer on disk (deleted to keep only the newest ones); return if it is there, or is not a
    snapshot (the usual not-found error then applies)."""
    _, name = checkpoint_paths.parse_path(checkpoint)
    settings = services().settings
    if (
        not is_snapshot(name)
        or checkpoint_paths.resolve(settings.checkpoints_dir, checkpoint).is_dir()
    ):
        return
    raise CheckpointNotFound(
        f"the sampler weights of this sampling client ({checkpoint}) are gone: only the newest "
        f"{settings.sampler_snapshots_kept} snapshots of save_weights_and_get_sampling_client "
        "are kept per run (EZTINKER_SAMPLER_SNAPSHOTS_KEPT); get a new sampling client, or "
        "save named weights with save_weights_for_sampler to keep them"
    )
