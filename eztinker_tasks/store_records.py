"""The records EZTinker keeps in Redis (``eztinker_tasks.store``): workers, runs, operations
and futures, as small frozen dataclasses stored as JSON strings under ``ezt:*`` keys; and the
Lua script that submits an operation atomically."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

from config.tenants import DEFAULT_TENANT

P = "ezt"


def tenant_runs_key(tenant: str) -> str:
    """Set of the tenant's run ids that are not deleted (its run limit counts them)."""
    return f"{P}:tenant:{tenant}:runs"


def tenant_ops_key(tenant: str) -> str:
    """Sorted set of the tenant's unfinished ops (future id -> submit time), kept only while
    an op limit is set; entries of finished ops are dropped when the tenant reaches it."""
    return f"{P}:tenant:{tenant}:ops"


class LimitReached(Exception):
    """A tenant is at one of its limits: the store changed nothing. ``count``: its count."""

    def __init__(self, count: int) -> None:
        super().__init__(f"limit reached at {count}")
        self.count = count


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def body_hash(payload: Mapping[str, Any]) -> str:
    """A stable hash of an operation's parameters, to tell a retry from a different request."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def known_fields(cls: type[DataclassInstance], data: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a stored record's JSON that are fields of ``cls`` (a dataclass): a
    record written by an older or newer version loads, its unknown keys dropped."""
    return {f.name: data[f.name] for f in fields(cls) if f.name in data}


@dataclass(frozen=True)
class WorkerRecord:
    name: str
    hostname: str
    pid: int
    device: str
    runs: tuple[str, ...] = ()
    memory: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    heartbeat_at: float = 0.0

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerRecord:
        data = json.loads(raw)
        data["runs"] = tuple(data.get("runs", ()))
        return cls(**known_fields(cls, data))


@dataclass(frozen=True)
class StartingWorker:
    """A worker process that is starting (importing, building its engine): not serving yet."""

    name: str
    pid: int
    device: str | None
    since: float  # time.time() when it was launched

    @classmethod
    def from_json(cls, raw: str | bytes) -> StartingWorker:
        return cls(**known_fields(cls, json.loads(raw)))


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    base_model: str
    lora: dict[str, Any]
    worker: str
    created_at: float
    status: str = "creating"  # creating | ready | recovering | failed | lost | deleted
    step: int = 0
    tokens_trained: int = 0
    last_loss: float | None = None
    last_state: str | None = None  # path of the newest state checkpoint
    error: str | None = None
    # Its ops are logged and its state snapshotted, so a dead worker's run recovers by itself
    # (``eztinker_tasks.recovery``).
    recoverable: bool = False
    tenant: str = DEFAULT_TENANT  # set by the web at creation; never changes

    @classmethod
    def from_json(cls, raw: str | bytes) -> RunRecord:
        return cls(**known_fields(cls, json.loads(raw)))


# Fields kept (also) in the run's stats hash, which the worker updates with each result; a
# status travels with its error, so a run that is healthy again shows no stale error.
STAT_FIELDS = ("step", "tokens_trained", "last_loss", "status", "error")


@dataclass(frozen=True)
class FutureRecord:
    future_id: str
    op: str
    queue: str
    submitted_at: float
    run_id: str | None = None
    seq_id: int | None = None
    worker: str | None = None
    tenant: str = DEFAULT_TENANT  # set by the web at submit

    @classmethod
    def from_json(cls, raw: str | bytes) -> FutureRecord:
        return cls(**known_fields(cls, json.loads(raw)))


@dataclass(frozen=True)
class QueuedMessage:
    """A task message ready to push onto a queue (built by ``eztinker_tasks.messages``)."""

    queue: str
    payload: str
    seq_token: str = ""  # where the submit script writes the seq_id it picks


@dataclass(frozen=True)
class OpClaim:
    """The outcome of claiming ``seq_id`` for an operation of a run."""

    seq_id: int
    future_id: str
    created: bool  # False: this seq_id was submitted before with the same body


# One round trip for a submit, all or nothing: refuse a run that is gone or whose creation
# failed, pick the seq_id (or take the client's), refuse or reuse a seq_id seen before, refuse
# a new op when the tenant has ``op limit`` unfinished ops, record the future (with the worker
# the run record names now: a run can move to another worker), write the seq_id into the task
# message and queue it (see ``eztinker_tasks.messages``), and count it as the tenant's; for a
# recoverable run, also append the message to the run's op log (``eztinker_tasks.oplog``).
# KEYS: run record, run stats hash, ops hash, seq counter, future record, queue, tenant ops,
# op log.
# ARGV: seq_id or "", op record (JSON), future record (JSON), future TTL (s), task message,
# the seq placeholder in the message, op limit (0: none, nothing counted), submit time.
# Returns {"gone"} | {"failed"} | {"dup", seq_id, existing op record} | {"behind", seq_id,
# latest} | {"full", count} | {"ok", seq_id}. A retry of a seq_id seen before is answered
# "dup" even at the limit; "full" is decided before an automatic seq_id is drawn.
SUBMIT_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {'gone'} end
local run = cjson.decode(raw)
local status = redis.call('HGET', KEYS[2], 'status')
if status then status = cjson.decode(status) else status = run['status'] end
if status == 'deleted' then return {'gone'} end
if status == 'failed' then return {'failed'} end
local limit = tonumber(ARGV[7])
local count = 0
if limit > 0 then count = redis.call('ZCARD', KEYS[7]) end
local seq = ARGV[1]
if seq == '' then
  if limit > 0 and count >= limit then return {'full', count} end
  seq = string.format('%.0f', redis.call('INCR', KEYS[4]))
end
local existing = redis.call('HGET', KEYS[3], seq)
if existing then return {'dup', seq, existing} end
if ARGV[1] ~= '' then
  if limit > 0 and count >= limit then return {'full', count} end
  local latest = redis.call('GET', KEYS[4]) or '0'
  if tonumber(seq) <= tonumber(latest) then return {'behind', seq, latest} end
  redis.call('SET', KEYS[4], seq)
end
redis.call('HSET', KEYS[3], seq, ARGV[2])
local future = cjson.decode(ARGV[3])
future['seq_id'] = tonumber(seq)
future['worker'] = run['worker']
redis.call('SET', KEYS[5], cjson.encode(future), 'EX', ARGV[4])
local message = ARGV[5]
local i, j = string.find(message, ARGV[6], 1, true)
if i then message = string.sub(message, 1, i - 1) .. seq .. string.sub(message, j + 1) end
redis.call('LPUSH', KEYS[6], message)
if limit > 0 then redis.call('ZADD', KEYS[7], ARGV[8], future['future_id']) end
if run['recoverable'] then redis.call('ZADD', KEYS[8], tonumber(seq), message) end
return {'ok', seq}
"""

# Queue an op that is no run operation (sample, logprobs, create, delete): refuse it when the
# tenant has ``op limit`` unfinished ops, else record the future, queue its message and count
# it as the tenant's. KEYS: future record, queue, tenant ops. ARGV: future record (JSON),
# future TTL (s), task message, op limit (0: none, nothing counted), future id, submit time.
# Returns {"full", count} | {"ok"}.
QUEUE_SCRIPT = """
local limit = tonumber(ARGV[4])
if limit > 0 then
  local count = redis.call('ZCARD', KEYS[3])
  if count >= limit then return {'full', count} end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[3])
if limit > 0 then redis.call('ZADD', KEYS[3], ARGV[6], ARGV[5]) end
return {'ok'}
"""

# Record a new run, unless its tenant already holds ``run limit`` runs that are not deleted.
# KEYS: run record, runs index, tenant runs. ARGV: run record (JSON), run id, created at,
# run limit (0: none). Returns {"full", count} | {"ok"}.
CREATE_RUN_SCRIPT = """
local limit = tonumber(ARGV[4])
if limit > 0 then
  local count = redis.call('SCARD', KEYS[3])
  if count >= limit then return {'full', count} end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return {'ok'}
"""
