"""The ``progress`` of an unfinished future: where it waits, or how far its worker has got.

- pending (queued): ``ops_ahead``, how many operations wait ahead of it in its queue (not
  counting one its worker is running now), and ``queue_length``;
- running: the phase and counts its worker last published (``eztinker_tasks.progress``), or
  phase ``running`` when there are none (a short operation, or one that reports no phases).

Times are from the server's clock: ``queued_s`` is how long it waited (or has waited so far) in
its queue, ``elapsed_s`` how long it has been running. Finding a queued future's place scans
the oldest messages of its queue on the Redis side (one script call, at most
``SCAN_LIMIT`` messages, reading only the end of each, where the message's id sits); it is done
only for futures still queued, never for finished ones.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from eztinker_tasks.progress import COUNTS, progress_key
from eztinker_tasks.store import FutureRecord

SCAN_LIMIT = 1000

# KEYS[1]: a kombu queue (a list: LPUSH adds, the worker pops from the right). ARGV[1]: the
# most messages to look at; ARGV[2]: a future id to stop at ("" for none). Returns the queue's
# length and the ids of its oldest messages, oldest first, up to and including ARGV[2].
_QUEUE_IDS = """
local n = redis.call('LLEN', KEYS[1])
local limit = math.min(n, tonumber(ARGV[1]))
local ids = {}
local i = 0
while i < limit do
  local last = math.min(i + 100, limit)
  local items = redis.call('LRANGE', KEYS[1], -last, -(i + 1))
  for j = #items, 1, -1 do
    local id = string.match(string.sub(items[j], -1024), '"correlation_id":%s*"([^"]*)"')
    ids[#ids + 1] = id or ''
    if id == ARGV[2] then return {n, ids} end
  end
  i = last
end
return {n, ids}
"""


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class QueuePlaces:
    """Where queued futures sit in their queues, scanning each queue once per request.

    ``whole=True`` (a batch request) scans a queue's head once and answers every future in
    it from that; otherwise the scan stops at the future asked about.
    """

    def __init__(self, client: redis.Redis, whole: bool = False) -> None:
        self._client = client
        self._whole = whole
        self._scans: dict[str, tuple[int, dict[str, int]]] = {}

    def place(self, queue: str, future_id: str) -> tuple[int | None, int]:
        """(operations ahead of ``future_id`` in ``queue`` or None if not found, queue length)."""
        scanned = self._scans.get(queue)
        if scanned is None:
            script = self._client.register_script(_QUEUE_IDS)
            stop = "" if self._whole else future_id
            length, ids = script(keys=[queue], args=[SCAN_LIMIT, stop])
            order: dict[str, int] = {}
            for i, raw in enumerate(ids):
                order.setdefault(_text(raw), i)
            scanned = (int(length), order)
            if self._whole:
                self._scans[queue] = scanned
        length, order = scanned
        return order.get(future_id), length


def read_running(
    client: redis.Redis, started_key: str, future_id: str
) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The future's start marker and its published progress, in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.get(started_key)
    pipe.hgetall(progress_key(future_id))
    raw_started, raw_progress = pipe.execute()
    started = json.loads(raw_started) if raw_started else None
    return started, {_text(k): _text(v) for k, v in (raw_progress or {}).items()}


def progress_body(
    record: FutureRecord,
    running: bool,
    started: dict[str, Any] | None,
    published: dict[str, str],
    places: QueuePlaces | None,
    now: float | None = None,
) -> dict[str, Any]:
    """The ``progress`` object of a pending or running future (see the module docstring)."""
    now = time.time() if now is None else now
    body: dict[str, Any] = {"phase": "queued", "ops_ahead": None, "queue_length": None}
    body.update(dict.fromkeys(COUNTS))
    if not running:
        body["queued_s"] = max(0.0, now - record.submitted_at)
        body["elapsed_s"] = 0.0
        if places is not None:
            body["ops_ahead"], body["queue_length"] = places.place(record.queue, record.future_id)
        return body
    started_at = _float(published.get("started_at")) or (float(started["at"]) if started else now)
    body["queued_s"] = max(0.0, started_at - record.submitted_at)
    body["elapsed_s"] = max(0.0, now - started_at)
    body["phase"] = published.get("phase") or "running"
    for name in COUNTS:
        if name in published:
            body[name] = int(published[name])
    return body


def _float(raw: str | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None
