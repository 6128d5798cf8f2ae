"""How the API shows a run: its record, as its worker's liveness says, with its checkpoints.

``GET /v1/runs`` and ``GET /v1/runs/<id>`` show the same fields. A run whose worker has no
heartbeat is shown ``recovering`` if it is recoverable (``eztinker_tasks.recovery``), else
``lost`` with the reason, whatever its record last said: its in-memory state went with that
worker, and a ``load`` moves it to a live one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from eztinker_tasks.store import RunRecord
from eztinker_web.checkpoints.listing import list_checkpoints
from eztinker_web.services import services

# Statuses of a run that needs its worker: without it the run is lost.
HELD = ("creating", "ready", "recovering", "lost")


def shown(record: RunRecord, live_workers: set[str]) -> RunRecord:
    """``record`` as it stands: ``lost``, saying why and what to do, when its state is gone.

    A run's state is gone when its worker is not alive, or when the worker restarted (it then
    marks its runs ``lost``). The reason is worded here, once, for every client.
    """
    alive = record.worker in live_workers
    if record.status not in HELD or (alive and record.status != "lost"):
        return record
    if record.recoverable and record.status != "lost":
        return replace(
            record,
            status="recovering",
            error=(
                f"worker {record.worker} is not alive; the run recovers by itself from its "
                "snapshot and logged operations, on that worker when it restarts or on another "
                "live worker"
            ),
        )
    resume = f" (its last: {record.last_state})" if record.last_state else ""
    if alive:
        why = f"worker {record.worker} restarted, and the run's in-memory state went with it"
        todo = f"load a saved state{resume} to resume"
    else:
        why = (
            f"worker {record.worker} is not alive (no heartbeat): the run's in-memory state "
            "went with it"
        )
        todo = f"load a saved state{resume} to move the run to a live worker"
    return replace(record, status="lost", error=f"{why}; {todo}")


def run_views(records: Sequence[RunRecord], one: bool = False) -> list[dict[str, Any]]:
    """The API form of ``records``: with status, checkpoints and the latest seq_id of each."""
    svc = services()
    live = {w.name for w in svc.store.live_workers()}
    ids = [r.run_id for r in records]
    found = list_checkpoints(svc.settings, ids[0] if one and ids else None)
    checkpoints: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    for c in found:
        if c.run_id in checkpoints:
            checkpoints[c.run_id].append(c.to_dict())
    last_seqs = svc.store.last_seqs(ids)
    return [
        {
            **asdict(shown(r, live)),
            "checkpoints": checkpoints[r.run_id],
            "last_seq_id": last_seqs[r.run_id],
        }
        for r in records
    ]
