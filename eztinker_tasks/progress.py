"""Publishing running operations' progress to Redis, for ``GET /v1/futures/<id>``.

The engine reports ``OpProgress`` (throttled by ``engine.progress.Ticker``) to the callback
that ``ProgressPublisher.track`` hands the task. That callback only keeps the newest report;
one background thread per worker process writes it, at most every ``interval_s``, to a small
hash per future with a TTL (``progress_key``). The operation's thread never waits for Redis,
and an operation shorter than ``delay_s`` writes nothing at all, so short operations (the hot
path) cost no Redis command. A Redis error is logged and skipped: progress is best-effort and
never fails an operation. The hash is deleted once the operation ends (its TTL covers a crash).

Hash fields, all strings: ``phase``; ``tokens_done``, ``tokens_total``, ``sequences``,
``sequences_finished`` when known; ``started_at`` (epoch seconds the operation started) and
``updated_at`` (epoch seconds of the report). Redis is the only dependency (the web reads it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis
from redis.typing import EncodableT, FieldT

from eztinker_tasks.types import OpProgress, ProgressFn

log = logging.getLogger(__name__)

COUNTS = ("tokens_done", "tokens_total", "sequences", "sequences_finished")


def progress_key(future_id: str) -> str:
    """The progress hash of ``future_id`` (beside its ``ezt:future:<id>`` record)."""
    return f"ezt:future:{future_id}:progress"


def progress_fields(state: OpProgress, started_at: float, now: float) -> dict[str, str]:
    """The hash of ``state``: unknown counts are left out."""
    fields = {"phase": state.phase, "started_at": repr(started_at), "updated_at": repr(now)}
    for name in COUNTS:
        value = getattr(state, name)
        if value is not None:
            fields[name] = str(int(value))
    return fields


@dataclass(eq=False)
class _Tracked:
    """One operation being run (its own future plus any coalesced into the same pass)."""

    future_ids: list[str]
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    latest: OpProgress | None = None
    written: OpProgress | None = None  # the report last written (None: nothing written yet)


class ProgressPublisher:
    """Writes the running operations' newest progress reports to Redis, off their threads."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        delay_s: float = 0.5,
        interval_s: float = 0.5,
        ttl_s: float = 3600.0,
    ) -> None:
        self._client = client
        self.delay_s = delay_s
        self.interval_s = interval_s
        self.ttl_s = max(1, int(ttl_s))
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._active: list[_Tracked] = []
        self._finished: list[_Tracked] = []  # ended after something was written: delete it
        self._thread: threading.Thread | None = None

    @contextmanager
    def track(self, future_ids: Iterable[str]) -> Generator[ProgressFn, None, None]:
        """A progress callback for the engine, publishing under each of ``future_ids``."""
        op = _Tracked(list(future_ids))

        def report(state: OpProgress) -> None:
            op.latest = state  # one attribute store: the engine's thread never waits

        with self._lock:  # no wake-up, no Redis: an operation's whole cost is this, twice
            self._active.append(op)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="eztinker-progress", daemon=True
                )
                self._thread.start()
        try:
            yield report
        finally:
            with self._lock:
                self._active.remove(op)
                if op.written is not None:
                    self._finished.append(op)

    def close(self) -> None:
        """Stop the thread (after one last flush)."""
        self._closed.set()

    def _run(self) -> None:
        # A tick every interval_s, busy or not (an idle tick costs no Redis command), so
        # operations never have to wake the thread.
        while not self._closed.wait(self.interval_s):
            try:
                self.flush()
            except Exception:  # never let the thread die: the next round tries again
                log.warning("progress publisher failed", exc_info=True)
        self.flush()

    def flush(self) -> None:
        """Write every changed report of an operation running for ``delay_s``; delete the
        reports of operations that ended (one pipelined round trip; called by the thread)."""
        now_mono, now = time.monotonic(), time.time()
        with self._lock:
            active, self._finished, finished = list(self._active), [], self._finished
        pipe = self._client.pipeline(transaction=True)
        wrote: list[tuple[_Tracked, OpProgress]] = []
        for op in active:
            state = op.latest
            if state is None or state is op.written or now_mono - op.started_mono < self.delay_s:
                continue
            fields = progress_fields(state, op.started_at, now)
            mapping: dict[FieldT, EncodableT] = {k: v for k, v in fields.items()}
            for future_id in op.future_ids:
                key = progress_key(future_id)
                pipe.delete(key)  # fields that are unknown now must not linger
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, self.ttl_s)
            wrote.append((op, state))
        for op in finished:
            pipe.delete(*(progress_key(f) for f in op.future_ids))
        if not wrote and not finished:
            return
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("progress not published (%s)", exc)
            return
        with self._lock:
            for op, state in wrote:
                op.written = state
                if op not in self._active:  # it ended while this was written: delete again
                    self._finished.append(op)
