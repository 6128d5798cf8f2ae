"""Streaming a sample's tokens as they are sampled: one Redis stream per streamed request.

The worker's decode loop hands each step of a request sent with ``stream=True`` to a
``RedisTokenSink`` (``types.TokenSink``), which appends it to the stream
``eztinker:tokens:<future id>`` (``XADD``; an entry ``{"s": [step, ...]}`` holds the steps
sampled since the last one: the first step at once, then at most one entry per
``FLUSH_INTERVAL_S``, so a fast model does not pay a round trip per token) and, in the same
round trip, reads the request's cancel flag ``eztinker:cancel:<future id>``: once the web sets
it (its client went away), the decode loop ends the request. When the request ends
(result or error stored under its future) the worker appends ``{"end": "1"}``. The web reads
the stream with a blocking ``XREAD`` (``eztinker_web.openai.streaming``); the future stays the
authority on the final result. Both keys expire (``TTL_S``), so nothing is left behind.

Torch-free: imported by the web (key names) and the tasks layer (the sink).
"""

from __future__ import annotations

import json
import logging
import time

import redis

from eztinker_tasks.types import TokenStep

log = logging.getLogger(__name__)

TTL_S = 600
FLUSH_INTERVAL_S = 0.01
MAX_ENTRIES = 100_000  # XADD MAXLEN ~: a runaway stream is trimmed, never unbounded


def stream_key(future_id: str) -> str:
    return f"eztinker:tokens:{future_id}"


def cancel_key(future_id: str) -> str:
    return f"eztinker:cancel:{future_id}"


def step_dict(step: TokenStep) -> dict:
    """A step as the stream carries it: ``{"i", "t", "l", "top"}`` (``top`` may be null)."""
    top = step.top_logprobs
    return {
        "i": step.index,
        "t": step.tokens,
        "l": step.logprobs,
        "top": None if top is None else [None if p is None else [list(x) for x in p] for p in top],
    }


def cancel(client: redis.Redis, future_id: str) -> None:
    """Ask the worker to stop the request (its consumer went away)."""
    client.set(cancel_key(future_id), "1", ex=TTL_S)


class RedisTokenSink:
    """``types.TokenSink`` writing a request's steps to its stream; True once cancelled."""

    def __init__(
        self, client: redis.Redis, future_id: str, interval_s: float = FLUSH_INTERVAL_S
    ) -> None:
        self.client, self.future_id, self.interval_s = client, future_id, interval_s
        self._key = stream_key(future_id)
        self._fresh = True
        self._pending: list[dict] = []
        self._flushed_at = 0.0
        self._cancelled = False

    def __call__(self, step: TokenStep) -> bool:
        self._pending.append(step_dict(step))
        if self._fresh or time.monotonic() - self._flushed_at >= self.interval_s:
            self._flush(end=False)
        return self._cancelled

    def _flush(self, end: bool) -> None:
        pipe = self.client.pipeline(transaction=False)
        if self._pending:
            data = json.dumps(self._pending, separators=(",", ":"))
            pipe.xadd(self._key, {"s": data}, maxlen=MAX_ENTRIES, approximate=True)
        if end:
            pipe.xadd(self._key, {"end": "1"}, maxlen=MAX_ENTRIES, approximate=True)
        pipe.expire(self._key, TTL_S)
        pipe.exists(cancel_key(self.future_id))
        *_, cancelled = pipe.execute()
        self._pending = []
        self._fresh = False
        self._flushed_at = time.monotonic()
        self._cancelled = bool(cancelled)

    def end(self) -> None:
        """The request ended (its result or error is stored): send what is left, and the end
        marker, so the reader stops waiting."""
        try:
            self._flush(end=True)
        except redis.RedisError:  # the reader polls the future too: it ends all the same
            log.warning("could not mark the end of stream %s", self._key)
