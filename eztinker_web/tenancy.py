"""Which objects the caller sees: every tenant rule of the API, in one place.

A run belongs to the tenant recorded on it at creation (``RunRecord.tenant``); a checkpoint
``<run_id>/<name>`` to its run's tenant; a future to the tenant that submitted it
(``FutureRecord.tenant``). An object the caller does not see is answered exactly as one that
does not exist (404, same code and message), so nothing tells another tenant it exists; lists
leave it out. A checkpoint whose run has no record (its owner is unknown) is seen only by
callers who see all (admin keys, or auth off).
"""

from __future__ import annotations

from collections.abc import Iterable

from eztinker_tasks import checkpoint_paths
from eztinker_tasks.errors import CheckpointNotFound, UnknownRun
from eztinker_tasks.store import RunRecord
from eztinker_tasks.tenant_store import run_owners
from eztinker_tasks.types import CheckpointInfo
from eztinker_web.auth import caller
from eztinker_web.services import services


def unknown_run(run_id: str) -> UnknownRun:
    return UnknownRun(f"unknown run {run_id!r}", errors={"run_id": ["not found"]})


def seen_run(record: RunRecord | None, run_id: str) -> RunRecord:
    """``record`` if it exists for the caller; UnknownRun (404) if absent or another tenant's."""
    if record is None or not caller().sees(record.tenant):
        raise unknown_run(run_id)
    return record


def check_run_owner(run_id: str, tenant: str) -> None:
    """UnknownRun (404) unless the caller sees runs of ``tenant`` (a cached run's owner)."""
    if not caller().sees(tenant):
        raise unknown_run(run_id)


def seen_runs(records: Iterable[RunRecord]) -> list[RunRecord]:
    """The caller's runs among ``records`` (all of them for a caller who sees all)."""
    who = caller()
    return [r for r in records if who.sees(r.tenant)]


def check_checkpoint(path: str) -> None:
    """CheckpointNotFound (404), worded as for a missing one, unless the caller sees the run
    the checkpoint ``path`` belongs to. Asked before the disk is: nothing on disk shows."""
    who = caller()
    if who.sees_all:
        return
    run_id, _ = checkpoint_paths.parse_path(path)
    if not who.sees(run_owners(services().store, [run_id])[run_id]):
        raise CheckpointNotFound(f"no checkpoint {path!r}", errors={"path": ["not found"]})


def check_run_checkpoints(run_id: str) -> None:
    """UnknownRun (404) unless the caller sees run ``run_id`` (deleted runs included: their
    checkpoints stay, and stay theirs)."""
    who = caller()
    if not who.sees_all and not who.sees(run_owners(services().store, [run_id])[run_id]):
        raise unknown_run(run_id)


def seen_checkpoints(found: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """The checkpoints among ``found`` whose run the caller sees (one read for all runs)."""
    who = caller()
    if who.sees_all:
        return found
    owners = run_owners(services().store, sorted({c.run_id for c in found}))
    return [c for c in found if who.sees(owners[c.run_id])]


def seen_model_names() -> set[str] | None:
    """Base models of the caller's runs (deleted ones too); None: the caller sees all."""
    who = caller()
    if who.sees_all:
        return None
    runs = services().store.list_runs(include_deleted=True)
    return {r.base_model for r in runs if who.sees(r.tenant)}
