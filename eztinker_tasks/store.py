"""Typed access to what EZTinker keeps in Redis: workers, runs, operations and futures.

This is the third type layer (beside the web schemas and the engine types): the records are
small frozen dataclasses stored as JSON strings under ``ezt:*`` keys (``store_records``, whose
names this module re-exports). The web process and the workers both use it; it imports
neither torch nor Celery.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from typing import Any

import redis

from eztinker_tasks.errors import Conflict, RunFailed, UnknownRun
from eztinker_tasks.store_records import (
    CREATE_RUN_SCRIPT,
    QUEUE_SCRIPT,
    STAT_FIELDS,
    SUBMIT_SCRIPT,
    FutureRecord,
    LimitReached,
    OpClaim,
    P,
    QueuedMessage,
    RunRecord,
    StartingWorker,
    WorkerRecord,
    _text,
    body_hash,
    tenant_ops_key,
    tenant_runs_key,
)
from eztinker_tasks.store_worker import Application, WorkerRecords

__all__ = [
    "STAT_FIELDS",
    "FutureRecord",
    "LimitReached",
    "OpClaim",
    "QueuedMessage",
    "RunRecord",
    "StartingWorker",
    "Store",
    "WorkerRecord",
    "body_hash",
]


class Store(WorkerRecords, Application):
    """Typed access to the ``ezt:*`` keys of one Redis database."""

    def __init__(self, client: redis.Redis, ttl_s: int = 7 * 24 * 3600) -> None:
        self.r = client
        self.ttl_s = ttl_s
        self._submit = client.register_script(SUBMIT_SCRIPT)
        self._queue = client.register_script(QUEUE_SCRIPT)
        self._create_run = client.register_script(CREATE_RUN_SCRIPT)

    # -- runs ------------------------------------------------------------------------------
    def put_run(self, record: RunRecord, run_limit: int = 0) -> None:
        """Record a new run as one of its tenant's runs, atomically.

        With ``run_limit`` > 0, raise LimitReached (and record nothing) if the tenant already
        holds that many runs that are not deleted.
        """
        keys = [f"{P}:run:{record.run_id}", f"{P}:runs", tenant_runs_key(record.tenant)]
        args = [json.dumps(asdict(record)), record.run_id, repr(record.created_at), run_limit]
        reply = self._create_run(keys=keys, args=args)
        if _text(reply[0]) == "full":
            raise LimitReached(int(reply[1]))

    def get_run(self, run_id: str) -> RunRecord | None:
        pipe = self.r.pipeline(transaction=False)
        pipe.get(f"{P}:run:{run_id}")
        pipe.hgetall(f"{P}:run:{run_id}:stats")
        raw, stats = pipe.execute()
        if not raw:
            return None
        record = RunRecord.from_json(raw)
        if stats:
            record = replace(record, **{_text(k): json.loads(v) for k, v in stats.items()})
        return record

    def _rewrite_run(
        self,
        run_id: str,
        change: Callable[[RunRecord], RunRecord | None],
        counters: Mapping[str, str] | None = None,
    ) -> tuple[RunRecord, bool] | None:
        """Apply ``change`` to the run record atomically (WATCH/MULTI, retried on a race).

        ``change`` returns the new record, or None to leave it as it is. Returns (the record
        as it is now, whether it was rewritten), or None if there is no such run. ``counters``
        go into the stats hash in the same transaction.
        """
        key = f"{P}:run:{run_id}"
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if not raw:
                        return None
                    record = RunRecord.from_json(raw)
                    changed = change(record)
                    if changed is None:
                        return record, False
                    pipe.multi()
                    pipe.set(key, json.dumps(asdict(changed)))
                    if changed.status == "deleted":  # no longer counts toward its tenant's limit
                        pipe.srem(tenant_runs_key(changed.tenant), run_id)
                    if counters:
                        pipe.hset(f"{key}:stats", mapping=dict(counters))
                    pipe.execute()
                    return changed, True
                except redis.WatchError:
                    continue

    def update_run(self, run_id: str, **changes: Any) -> RunRecord | None:
        """Change fields of the run record (the fast-moving counters live in its stats hash).

        Atomic against other writers (the web and the workers both update runs).
        """
        counters = {k: json.dumps(changes[k]) for k in STAT_FIELDS if k in changes}
        done = self._rewrite_run(run_id, lambda r: replace(r, **changes), counters)
        return done[0] if done else None

    def replace_last_state(self, run_id: str, gone: str, newest: str | None) -> None:
        """Name ``newest`` (a state checkpoint path, or None) as the run's ``last_state`` if
        it still names ``gone``, a checkpoint just deleted (atomic against a save that names
        a new one meanwhile)."""
        self._rewrite_run(
            run_id, lambda r: replace(r, last_state=newest) if r.last_state == gone else None
        )

    def move_run(self, run_id: str, from_worker: str, to_worker: str) -> tuple[RunRecord, bool]:
        """Record ``to_worker`` as the run's worker if it is still ``from_worker``.

        Returns the run as it is now and whether this call moved it (False: another request
        moved it first, and the record names that move's worker). Raises UnknownRun if the run
        is gone.
        """
        done = self._rewrite_run(
            run_id, lambda r: replace(r, worker=to_worker) if r.worker == from_worker else None
        )
        if done is None:
            raise UnknownRun(f"unknown run {run_id!r}", errors={"run_id": ["not found"]})
        return done

    def list_runs(self, include_deleted: bool = False) -> list[RunRecord]:
        ids = [_text(i) for i in self.r.zrange(f"{P}:runs", 0, -1)]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.get(f"{P}:run:{i}")
            pipe.hgetall(f"{P}:run:{i}:stats")
        out = pipe.execute()
        runs = []
        for raw, stats in zip(out[::2], out[1::2], strict=True):
            if not raw:
                continue
            record = RunRecord.from_json(raw)
            if stats:
                record = replace(record, **{_text(k): json.loads(v) for k, v in stats.items()})
            runs.append(record)
        return [r for r in runs if include_deleted or r.status != "deleted"]

    def runs_of_worker(self, worker: str) -> list[RunRecord]:
        return [r for r in self.list_runs() if r.worker == worker]

    # -- operations and futures ------------------------------------------------------------
    def last_seq(self, run_id: str) -> int:
        raw = self.r.get(f"{P}:run:{run_id}:seq")
        return int(raw) if raw else 0

    def last_seqs(self, run_ids: list[str]) -> dict[str, int]:
        """``last_seq`` of each run, in one round trip."""
        if not run_ids:
            return {}
        raws = self.r.mget([f"{P}:run:{i}:seq" for i in run_ids])
        return {i: int(raw) if raw else 0 for i, raw in zip(run_ids, raws, strict=True)}

    def op_futures(self, run_id: str, seq_ids: list[int]) -> dict[int, str]:
        """The future each of ``seq_ids`` of the run was submitted under (those that were)."""
        if not seq_ids:
            return {}
        claims = self.r.hmget(f"{P}:run:{run_id}:ops", [str(s) for s in seq_ids])
        return {
            seq: json.loads(claim)["future_id"]
            for seq, claim in zip(seq_ids, claims, strict=True)
            if claim
        }

    def submit_op(
        self,
        run_id: str,
        seq_id: int | None,
        digest: str,
        future: FutureRecord,
        message: QueuedMessage,
        op_limit: int = 0,
    ) -> OpClaim:
        """Claim ``seq_id`` (or the next one) for ``future`` and queue its message, atomically.

        A seq_id claimed before with the same body returns the earlier future
        (``created=False``, nothing queued); with another body it raises Conflict, and so does
        a new seq_id that is not above the run's latest (it would run out of order). A run that
        does not exist or was deleted raises UnknownRun; one whose creation failed, RunFailed.
        With ``op_limit`` > 0 the op counts as one of its tenant's unfinished ops, and a new
        one raises LimitReached (nothing queued) when the tenant has that many already.
        """
        value = json.dumps({"future_id": future.future_id, "digest": digest})
        keys = [
            f"{P}:run:{run_id}",
            f"{P}:run:{run_id}:stats",
            f"{P}:run:{run_id}:ops",
            f"{P}:run:{run_id}:seq",
            self.future_key(future.future_id),
            message.queue,
            tenant_ops_key(future.tenant),
            f"{P}:run:{run_id}:log",
        ]
        args = [
            "" if seq_id is None else str(seq_id),
            value,
            json.dumps(asdict(future)),
            str(self.ttl_s),
            message.payload,
            message.seq_token,
            op_limit,
            repr(future.submitted_at),
        ]
        reply = self._submit(keys=keys, args=args)
        outcome = _text(reply[0])
        if outcome == "full":
            raise LimitReached(int(reply[1]))
        if outcome == "gone":
            raise UnknownRun(f"unknown run {run_id!r}", errors={"run_id": ["not found"]})
        if outcome == "failed":
            record = self.get_run(run_id)
            raise RunFailed.of(run_id, record.error if record else None)
        seq = int(reply[1])
        if outcome == "ok":
            return OpClaim(seq, future.future_id, created=True)
        if outcome == "behind":
            latest = int(reply[2])
            raise Conflict(
                f"seq_id {seq} is not after seq_id {latest}, the latest of run {run_id}: a run "
                "applies its operations in seq_id order, so a new one needs a higher seq_id "
                f"(or send none: the server assigns {latest + 1})",
                errors={"seq_id": [f"must be greater than {latest}"]},
            )
        prior = json.loads(reply[2])
        if prior["digest"] != digest:
            raise Conflict(
                f"seq_id {seq} of run {run_id} was already used for a different request",
                errors={"seq_id": ["reused with a different body"]},
            )
        return OpClaim(seq, prior["future_id"], created=False)

    def queue_op(
        self, future: FutureRecord, message: QueuedMessage, op_limit: int = 0, log: bool = False
    ) -> None:
        """Record ``future`` and queue its message, atomically.

        With ``op_limit`` > 0 the op counts as one of its tenant's unfinished ops, and it
        raises LimitReached (nothing queued) when the tenant has that many already.
        ``log``: also append the message to its run's op log under the future's seq_id (a
        recoverable run's ``create_run``, seq_id 0, which no limit counts).
        """
        if op_limit <= 0 or log:
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self.future_key(future.future_id), json.dumps(asdict(future)), ex=self.ttl_s)
            pipe.lpush(message.queue, message.payload)
            if log and future.run_id is not None:
                pipe.zadd(f"{P}:run:{future.run_id}:log", {message.payload: future.seq_id or 0})
            pipe.execute()
            return
        keys = [self.future_key(future.future_id), message.queue, tenant_ops_key(future.tenant)]
        args = [
            json.dumps(asdict(future)),
            self.ttl_s,
            message.payload,
            op_limit,
            future.future_id,
            repr(future.submitted_at),
        ]
        reply = self._queue(keys=keys, args=args)
        if _text(reply[0]) == "full":
            raise LimitReached(int(reply[1]))

    def get_future(self, future_id: str) -> FutureRecord | None:
        raw = self.r.get(self.future_key(future_id))
        return FutureRecord.from_json(raw) if raw else None

    def started(self, future_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.future_key(future_id) + ":started")
        return json.loads(raw) if raw else None

    # -- models ----------------------------------------------------------------------------
    def put_model(self, info: Mapping[str, Any]) -> None:
        self.r.hset(f"{P}:models", str(info["name"]), json.dumps(dict(info)))

    def get_model(self, name: str) -> dict[str, Any] | None:
        raw = self.r.hget(f"{P}:models", name)
        return json.loads(raw) if raw else None

    def list_models(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.r.hvals(f"{P}:models")]
