"""What a recoverable run keeps in Redis so that a dead worker costs seconds, never work.

- ``ezt:run:<id>:log``: a sorted set of the run's op messages (score: seq_id), appended by the
  web in the same script that queues each op (``store_records.SUBMIT_SCRIPT``; ``create_run``
  is logged at seq_id 0). Entries up to the newest committed snapshot are trimmed away.
- ``ezt:run:<id>:snapshot``: the newest committed snapshot (``SnapshotRecord``): the run's
  state after every op up to ``seq_id``, in a state checkpoint directory under
  ``CHECKPOINTS_DIR/.snapshots`` (shared where the checkpoints are).
- ``ezt:run:<id>:crashes``: seq_id -> how many times that op was running when its worker
  died (``eztinker_tasks.recovery`` fails an op that crashed its worker twice).
- ``ezt:run:<id>:orphaned``: when the run was first seen without a live worker (the web and
  the workers set it; recovery clears it).

Recovery = the snapshot + the logged ops after it, applied in seq_id order
(``eztinker_tasks.recovery``). Torch-free: the web uses it too.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from eztinker_tasks.coalesce import decode_message
from eztinker_tasks.store_records import P, known_fields


@dataclass(frozen=True)
class SnapshotRecord:
    """A committed snapshot: the run's state after op ``seq_id`` (step ``step``)."""

    seq_id: int
    path: str  # absolute path of the state checkpoint directory
    step: int
    at: float  # time.time() when it was committed
    worker: str

    @classmethod
    def from_json(cls, raw: str | bytes) -> SnapshotRecord:
        return cls(**known_fields(cls, json.loads(raw)))


@dataclass(frozen=True)
class LoggedOp:
    """One op of the log: its seq_id, task name, future (task) id, kwargs and raw message."""

    seq_id: int
    task: str
    future_id: str
    kwargs: dict[str, Any]
    raw: bytes


def _key(run_id: str, what: str) -> str:
    return f"{P}:run:{run_id}:{what}"


class OpLog:
    """The recovery keys of every run in one Redis database."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def snapshot(self, run_id: str) -> SnapshotRecord | None:
        raw = self.r.get(_key(run_id, "snapshot"))
        return SnapshotRecord.from_json(raw) if raw else None

    def entries(self, run_id: str, after: int = -1) -> list[LoggedOp]:
        """The logged ops with a seq_id above ``after``, in seq_id order (undecodable: skipped)."""
        raws = self.r.zrangebyscore(_key(run_id, "log"), f"({after}", "+inf", withscores=True)
        out = []
        for raw, score in raws:
            raw = raw if isinstance(raw, bytes) else str(raw).encode()
            decoded = decode_message(raw)
            if decoded is None:
                continue
            task, future_id, kwargs = decoded
            out.append(LoggedOp(int(score), task, future_id, kwargs, raw))
        return out

    def has_log(self, run_id: str) -> bool:
        pipe = self.r.pipeline(transaction=False)
        pipe.exists(_key(run_id, "snapshot"))
        pipe.zcard(_key(run_id, "log"))
        snap, logged = pipe.execute()
        return bool(snap) or bool(logged)

    def commit_snapshot(self, run_id: str, record: SnapshotRecord) -> SnapshotRecord | None:
        """Record ``record`` as the run's snapshot and trim the log up to its seq_id, atomically.

        Returns the snapshot it replaced, or None. A snapshot older than the one committed
        already is not recorded (returned as is, so the caller deletes its files).
        """
        key = _key(run_id, "snapshot")
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    old = SnapshotRecord.from_json(raw) if raw else None
                    if old is not None and old.seq_id > record.seq_id:
                        pipe.unwatch()
                        return record
                    pipe.multi()
                    pipe.set(key, json.dumps(asdict(record)))
                    pipe.zremrangebyscore(_key(run_id, "log"), "-inf", record.seq_id)
                    pipe.execute()
                    return old
                except redis.WatchError:
                    continue

    def count_crash(self, run_id: str, seq_id: int) -> int:
        """One more time op ``seq_id`` was running when its worker died; the count so far."""
        return int(self.r.hincrby(_key(run_id, "crashes"), str(seq_id), 1))

    def orphaned_since(self, run_id: str) -> float:
        """When the run was first seen without a live worker (now, if this is the first time)."""
        key = _key(run_id, "orphaned")
        pipe = self.r.pipeline(transaction=False)
        pipe.set(key, repr(time.time()), nx=True, ex=7 * 24 * 3600)
        pipe.get(key)
        _, raw = pipe.execute()
        return float(raw) if raw else time.time()

    def adopted(self, run_id: str) -> None:
        """The run has a live worker again: forget when it was orphaned."""
        self.r.delete(_key(run_id, "orphaned"))

    def forget(self, run_id: str) -> None:
        """Drop every recovery key of a deleted run."""
        self.r.delete(*(_key(run_id, w) for w in ("log", "snapshot", "crashes", "orphaned")))
