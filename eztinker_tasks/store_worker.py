"""The worker-facing parts of ``eztinker_tasks.store.Store``: worker records (heartbeats, starting
workers) and the idempotent application of operations (begin, finish, answers, applied seq_ids).

``Store`` inherits both; they use its Redis client ``r`` and its TTL ``ttl_s``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, NamedTuple, TypeVar

import redis

from eztinker_tasks.store_records import P, RunRecord, StartingWorker, WorkerRecord, _text

R = TypeVar("R")


DELETED = "deleted"

# KEYS[1]: a run's stats hash; ARGV[1]: the deleted status (JSON); then field, value pairs.
_STATS_UNLESS_DELETED = """
if redis.call('HGET', KEYS[1], 'status') == ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class Begun(NamedTuple):
    """What a worker learns when it starts an operation (``Application.begin_op``)."""

    prior: str | None  # the future that already applied the op's seq_id, if any
    queued: list[bytes]  # with ``peek=(queue, n)``: the oldest n messages of queue (oldest last)
    owner: str | None = None  # a run op: the worker its run record names now


class WorkerRecords:
    """Workers: live ones (heartbeat records with a TTL) and starting ones."""

    r: redis.Redis
    ttl_s: int

    def heartbeat(self, record: WorkerRecord, ttl_s: float) -> None:
        record = replace(record, heartbeat_at=time.time())
        pipe = self.r.pipeline()
        pipe.set(f"{P}:worker:{record.name}", json.dumps(asdict(record)), px=int(ttl_s * 1000))
        pipe.sadd(f"{P}:workers", record.name)
        pipe.execute()

    def forget_worker(self, name: str) -> None:
        self.r.delete(f"{P}:worker:{name}")
        self.r.srem(f"{P}:workers", name)

    def worker(self, name: str) -> WorkerRecord | None:
        raw = self.r.get(f"{P}:worker:{name}")
        return WorkerRecord.from_json(raw) if raw else None

    def live_workers(self) -> list[WorkerRecord]:
        return self._members("workers", "worker", WorkerRecord.from_json)

    def worker_starting(self, record: StartingWorker, ttl_s: float) -> None:
        """Record (or refresh) a starting worker; the record lapses after ``ttl_s`` seconds.

        A refresh (same name and pid) keeps the earliest ``since``: the supervisor records the
        worker when it launches it, the worker itself once it runs.
        """
        raw = self.r.get(f"{P}:starting:{record.name}")
        if raw:
            known = StartingWorker.from_json(raw)
            if known.pid == record.pid:
                record = replace(record, since=min(known.since, record.since))
        pipe = self.r.pipeline()
        pipe.set(f"{P}:starting:{record.name}", json.dumps(asdict(record)), px=int(ttl_s * 1000))
        pipe.sadd(f"{P}:starting", record.name)
        pipe.execute()

    def forget_starting(self, name: str) -> None:
        pipe = self.r.pipeline()
        pipe.delete(f"{P}:starting:{name}")
        pipe.srem(f"{P}:starting", name)
        pipe.execute()

    def starting_workers(self) -> list[StartingWorker]:
        """Workers launched but not yet live (their heartbeat has not begun)."""
        return self._members("starting", "starting", StartingWorker.from_json)

    def _members(self, index: str, kind: str, load: Callable[[str | bytes], R]) -> list[R]:
        """The records ``ezt:<kind>:<name>`` of the names in the set ``ezt:<index>``, by name;
        a name whose record lapsed (TTL) leaves the set."""
        names = sorted(_text(n) for n in self.r.smembers(f"{P}:{index}"))
        if not names:
            return []
        raws = self.r.mget([f"{P}:{kind}:{n}" for n in names])
        out = []
        for name, raw in zip(names, raws, strict=True):
            if raw is None:
                self.r.srem(f"{P}:{index}", name)
            else:
                out.append(load(raw))
        return out


class Application:
    """Applying a run's operations at most once each, in seq_id order (on the workers)."""

    r: redis.Redis
    ttl_s: int

    @staticmethod
    def future_key(future_id: str) -> str:
        return f"{P}:future:{future_id}"

    def begin_commands(
        self,
        future_id: str,
        worker: str,
        run_id: str | None,
        seq_id: int | None,
        peek: tuple[str, int] | None = None,
    ) -> list[tuple[Any, ...]]:
        """The commands of ``begin_op``: its replies go to ``begun``."""
        started = json.dumps({"at": time.time(), "worker": worker})
        commands: list[tuple[Any, ...]] = [
            ("SET", self.future_key(future_id) + ":started", started, "EX", self.ttl_s)
        ]
        if run_id is not None and seq_id is not None:
            commands.append(("HGET", self._applied_key(run_id), str(seq_id)))
            commands.append(("GET", f"{P}:run:{run_id}"))  # its owner: see ``Begun.owner``
        if peek is not None and peek[1] > 0:
            commands.append(("LRANGE", peek[0], -peek[1], -1))
        return commands

    @staticmethod
    def begun(commands: list[tuple[Any, ...]], replies: list[Any]) -> Begun:
        """What ``begin_op`` learnt, from the replies to ``begin_commands``."""
        prior: str | None = None
        queued: list[bytes] = []
        owner: str | None = None
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            if command[0] == "HGET" and reply:
                prior = _text(reply)
            elif command[0] == "LRANGE":
                queued = list(reply)
            elif command[0] == "GET" and reply:
                owner = RunRecord.from_json(reply).worker
        return Begun(prior, queued, owner)

    def begin_op(
        self,
        future_id: str,
        worker: str,
        run_id: str | None,
        seq_id: int | None,
        peek: tuple[str, int] | None = None,
    ) -> Begun:
        """Mark ``future_id`` started, in one round trip (see ``Begun``)."""
        commands = self.begin_commands(future_id, worker, run_id, seq_id, peek)
        pipe = self.r.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return self.begun(commands, pipe.execute(raise_on_error=False))

    def finish_op(
        self,
        run_id: str,
        seq_id: int | None,
        future_id: str,
        pipe: redis.client.Pipeline,
        **stats: Any,
    ) -> None:
        """Add to ``pipe`` (the caller executes it): ``seq_id`` was applied; the new counters."""
        if seq_id is not None:
            key = self._applied_key(run_id)
            pipe.hset(key, str(seq_id), future_id)
            pipe.expire(key, self.ttl_s)
        if stats:
            # A run deleted while this op ran stays deleted: its stats are not written (the
            # op's "ready" would bring it back into run lists).
            args = [json.dumps(DELETED)]
            for name, value in stats.items():
                args += [name, json.dumps(value)]
            pipe.eval(_STATS_UNLESS_DELETED, 1, f"{P}:run:{run_id}:stats", *args)

    def queue_heads(self, queues: list[str], n: int) -> dict[str, list[bytes]]:
        """The oldest ``n`` messages of each queue (oldest last), in one round trip."""
        if not queues or n <= 0:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for queue in queues:
            pipe.lrange(queue, -n, -1)
        return dict(zip(queues, pipe.execute(), strict=True))

    def answer_call(
        self,
        run_id: str,
        seq_id: int | None,
        future_id: str,
        key: str,
        value: str,
        expires_s: int,
        pipe: redis.client.Pipeline,
    ) -> None:
        """Add to ``pipe``: store (and publish) a call's result record; with ``seq_id``, record
        that seq_id of the run as applied under ``future_id``."""
        pipe.set(key, value, ex=expires_s)
        pipe.publish(key, value)
        if seq_id is not None:
            applied = self._applied_key(run_id)
            pipe.hset(applied, str(seq_id), future_id)
            pipe.expire(applied, self.ttl_s)

    def answer_many(
        self,
        run_id: str,
        answers: list[tuple[int, str, str, str]],
        expires_s: int,
        pipe: redis.client.Pipeline,
    ) -> None:
        """Add to ``pipe``: store the results of coalesced ops and mark them applied.

        ``answers``: (seq_id, future_id, result key, encoded result record) each; the record is
        published on its key's channel too, as the result backend does.
        """
        if not answers:
            return
        applied = self._applied_key(run_id)
        for seq_id, future_id, key, value in answers:
            pipe.set(key, value, ex=expires_s)
            pipe.publish(key, value)
            pipe.hset(applied, str(seq_id), future_id)
        pipe.expire(applied, self.ttl_s)

    @staticmethod
    def _applied_key(run_id: str) -> str:
        """Hash of seq_id -> the future under which that op of the run was applied."""
        return f"{P}:run:{run_id}:applied"

    def applied_future(self, run_id: str, seq_id: int) -> str | None:
        """The future under which ``seq_id`` was applied to the run, if it was."""
        raw = self.r.hget(self._applied_key(run_id), str(seq_id))
        return _text(raw) if raw else None
