"""An operation's start-up round trip, sent the moment its message arrives.

Every task begins with ``Store.begin_op``: mark the future started, look up whether its seq_id
was already applied, peek at the run's queue for operations to coalesce. The worker's consumer
thread sends those commands as soon as Celery has the message (``task_received``), without
waiting for the replies; the task, once the pool thread runs it, reads them. The round trip
overlaps Celery's hand-off instead of following it.

The task checks that what was sent is what it would have asked (``BeginSpec`` equality); if
not, or if the prefetch failed, it makes the round trip itself. So a prefetch can only save
time, never change an answer.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import redis

from eztinker_tasks import names
from eztinker_tasks.deferred import Batch, DeferredReplies
from eztinker_tasks.store import Store
from eztinker_tasks.store_worker import Begun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BeginSpec:
    """What ``begin_op`` asks for one operation."""

    future_id: str
    run_id: str | None = None  # set only with seq_id: the run whose applied set is checked
    seq_id: int | None = None
    peek: int = 0  # how many queued messages of the run to look at

    @classmethod
    def of(cls, future_id: str, run_id: str | None, seq_id: int | None, peek: int) -> BeginSpec:
        if run_id is None or seq_id is None:
            return cls(future_id)
        return cls(future_id, run_id, seq_id, max(0, peek))

    def queue(self) -> tuple[str, int] | None:
        return (names.run_queue(self.run_id), self.peek) if self.run_id and self.peek else None


class BeginPrefetch:
    KEEP = 8  # prefetches never taken (a revoked message) are dropped beyond this many

    def __init__(self, store: Store, replies: DeferredReplies) -> None:
        self._store = store
        self._replies = replies
        self._lock = threading.Lock()
        self._sent: OrderedDict[str, tuple[BeginSpec, list[tuple[Any, ...]], Batch]] = OrderedDict()

    def send(self, spec: BeginSpec, worker: str) -> None:
        """Send ``begin_op``'s commands for ``spec`` now (consumer thread)."""
        commands = self._store.begin_commands(
            spec.future_id, worker, spec.run_id, spec.seq_id, spec.queue()
        )
        try:
            batch = self._replies.send(commands)
        except redis.RedisError as exc:
            log.debug("begin prefetch not sent (%s); the task will ask itself", exc)
            return
        with self._lock:
            self._sent[spec.future_id] = (spec, commands, batch)
            while len(self._sent) > self.KEEP:
                self._sent.popitem(last=False)

    def begin(self, spec: BeginSpec, worker: str) -> Begun:
        """``begin_op`` for ``spec``: from the prefetch if one was sent for it, else asked now."""
        with self._lock:
            sent = self._sent.pop(spec.future_id, None)
        if sent is not None and sent[0] == spec:
            try:
                return self._store.begun(sent[1], sent[2].replies())
            except redis.RedisError as exc:
                log.debug("begin prefetch failed (%s); asking again", exc)
        return self._store.begin_op(spec.future_id, worker, spec.run_id, spec.seq_id, spec.queue())
