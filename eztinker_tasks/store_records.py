"""The records EZTinker keeps in Redis (``eztinker_tasks.store``): workers, runs, operations
and futures, as small frozen dataclasses stored as JSON strings under ``ezt:*`` keys; and the
Lua script that submits an operation atomically."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

P = "ezt"


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def body_hash(payload: Mapping[str, Any]) -> str:
    """A stable hash of an operation's parameters, to tell a retry from a different request."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class StartingWorker:
    """A worker process that is starting (importing, building its engine): not serving yet."""

    name: str
    pid: int
    device: str | None
    since: float  # time.time() when it was launched

    @classmethod
    def from_json(cls, raw: str | bytes) -> StartingWorker:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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

    @classmethod
    def from_json(cls, raw: str | bytes) -> RunRecord:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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

    @classmethod
    def from_json(cls, raw: str | bytes) -> FutureRecord:
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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
# failed, pick the seq_id (or take the client's), refuse or reuse a seq_id seen before, record
# the future (with the worker the run record names now: a run can move to another worker),
# write the seq_id into the task message and queue it (see ``eztinker_tasks.messages``); for a
# recoverable run, also append the message to the run's op log (``eztinker_tasks.oplog``).
# KEYS: run record, run stats hash, ops hash, seq counter, future record, queue, op log.
# ARGV: seq_id or "", op record (JSON), future record (JSON), future TTL (s), task message,
# the seq placeholder in the message.
# Returns {"gone"} | {"failed"} | {"dup", seq_id, existing op record} | {"behind", seq_id,
# latest} | {"ok", seq_id}.
SUBMIT_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {'gone'} end
local run = cjson.decode(raw)
local status = redis.call('HGET', KEYS[2], 'status')
if status then status = cjson.decode(status) else status = run['status'] end
if status == 'deleted' then return {'gone'} end
if status == 'failed' then return {'failed'} end
local seq = ARGV[1]
if seq == '' then
  seq = string.format('%.0f', redis.call('INCR', KEYS[4]))
end
local existing = redis.call('HGET', KEYS[3], seq)
if existing then return {'dup', seq, existing} end
if ARGV[1] ~= '' then
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
if run['recoverable'] then redis.call('ZADD', KEYS[7], tonumber(seq), message) end
return {'ok', seq}
"""
