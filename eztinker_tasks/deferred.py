"""Redis commands sent now whose replies are read later: a round trip off the critical path.

A worker makes two Redis round trips between taking a message off a run's queue and starting
the operation: kombu records the message as unacknowledged (so that it comes back if the worker
dies), and the task marks its future started and checks its seq_id. Neither reply is needed
at once, so both batches of commands go out as soon as the message arrives and their replies are
read when they are needed: the round trips overlap Celery's hand-off of the message to the pool
thread instead of following it.

``DeferredReplies`` owns one connection. ``send`` writes a batch of commands without waiting;
``Batch.replies()`` reads replies in the order the batches were sent, up to its own. A
connection error fails every batch still waiting (callers fall back to a plain round trip) and
the next ``send`` reconnects.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis

Command = tuple[Any, ...]


class Batch:
    def __init__(self, owner: DeferredReplies, size: int) -> None:
        self._owner = owner
        self.size = size
        self.done = False
        self.error: Exception | None = None
        self.values: list[Any] = []

    def replies(self) -> list[Any]:
        """The replies, one per command (a command's error reply is returned, not raised).

        Raises ``redis.RedisError`` if the connection failed before they were read.
        """
        if not self.done:
            self._owner.read_through(self)
        if self.error is not None:
            raise self.error
        return self.values


class DeferredReplies:
    def __init__(self, pool: redis.ConnectionPool, read_timeout_s: float = 30.0) -> None:
        self._pool = pool
        self._timeout_s = read_timeout_s
        self._conn: Any = None
        self._lock = threading.Lock()
        self._waiting: deque[Batch] = deque()

    def send(self, commands: Sequence[Command]) -> Batch:
        """Write ``commands`` now; their replies are read by ``Batch.replies`` (or ``drain``)."""
        with self._lock:
            if self._conn is None:
                self._conn = self._pool.make_connection()
            batch = Batch(self, len(commands))
            try:
                self._read_arrived()
                # No health check: its PING would read a reply still owed to a batch.
                self._conn.send_packed_command(
                    self._conn.pack_commands(commands), check_health=False
                )
            except (redis.RedisError, OSError) as exc:
                self._fail(exc)
                raise
            self._waiting.append(batch)
            return batch

    def read_through(self, batch: Batch) -> None:
        with self._lock:
            while not batch.done and self._waiting:
                try:
                    self._read_head()
                except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                    self._fail(exc)
            if not batch.done:  # cannot happen: every batch sent is read or failed
                batch.error, batch.done = redis.ConnectionError("reply lost"), True

    def drain(self) -> None:
        """Read every reply still owed (errors are left on their batches)."""
        with self._lock:
            last = self._waiting[-1] if self._waiting else None
        if last is not None:
            self.read_through(last)

    def close(self) -> None:
        with self._lock:
            self._fail(redis.ConnectionError("closed"))

    def _read_arrived(self) -> None:
        """Read the replies that have already arrived (so that unread ones never pile up)."""
        while self._waiting and self._conn.can_read(timeout=0):
            self._read_head()

    def _read_head(self) -> None:
        head = self._waiting[0]
        head.values = [self._read() for _ in range(head.size)]
        self._waiting.popleft()
        head.done = True

    def _read(self) -> Any:
        if not self._conn.can_read(timeout=self._timeout_s):
            raise redis.TimeoutError(f"no reply from Redis in {self._timeout_s:.0f} s")
        try:
            return self._conn.read_response()
        except redis.ResponseError as exc:
            return exc

    def _fail(self, exc: Exception) -> None:
        """The connection is gone: every batch still waiting fails with ``exc``."""
        error = exc if isinstance(exc, redis.RedisError) else redis.ConnectionError(str(exc))
        for batch in self._waiting:
            batch.error, batch.done = error, True
        self._waiting.clear()
        if self._conn is not None:
            self._conn.disconnect()
            self._conn = None
