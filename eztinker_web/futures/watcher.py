"""Waking long-polls when results land: one pub/sub subscription per web process.

The Redis result backend publishes every stored result on the channel named after its key.
Instead of subscribing (and opening a connection) per waiting request, one listener thread per
process pattern-subscribes to all result channels and wakes the requests waiting on that id.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger(__name__)

META_PREFIX = "celery-task-meta-"


def _parse(payload: bytes | str) -> dict[str, Any]:
    try:
        meta = json.loads(payload)
    except ValueError:
        return {"status": "PENDING"}
    return meta if isinstance(meta, dict) else {"status": "PENDING"}


class ResultWatcher:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._payloads: dict[str, bytes | str] = {}  # the last result published, per waited id
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def close(self) -> None:
        """The process is stopping: every long-poll answers now with what it has."""
        with self._lock:
            self._closed = True
        self._wake_all()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="eztinker-result-watcher", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(META_PREFIX + "*")
                self._listening.set()
                for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    self._wake(channel[len(META_PREFIX) :], message.get("data"))
            except redis.RedisError as exc:
                if not self._closed:  # else the process is stopping: nothing to reconnect for
                    log.warning("result watcher lost its connection (%s); reconnecting", exc)
            finally:
                self._listening.clear()
                self._wake_all()  # waiters fall back to reading the result themselves
                pubsub.close()
            time.sleep(0.5)

    def _wake(self, future_id: str, payload: bytes | str | None = None) -> None:
        with self._lock:
            events = list(self._waiters.get(future_id, ()))
            if events and payload is not None:
                self._payloads[future_id] = payload
        for event in events:
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = [e for group in self._waiters.values() for e in group]
        for event in events:
            event.set()

    def wait(
        self,
        future_id: str,
        read: Callable[[], dict[str, Any]],
        done: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        stalled: Callable[[], bool],
    ) -> dict[str, Any]:
        """Follow the result (as published, else ``read``) until ``done`` or ``timeout_s``.

        Every second without news it also asks ``stalled`` (worker gone, ...) and gives up then.
        """
        self._ensure_started()
        self._listening.wait(1.0)
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(future_id, set()).add(event)
        try:
            meta = read()  # read after registering: a result landing now still wakes us
            deadline = time.monotonic() + timeout_s
            while not done(meta) and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                woke = event.wait(min(left, 1.0 if self._listening.is_set() else 0.05))
                event.clear()
                with self._lock:
                    payload = self._payloads.pop(future_id, None)
                meta = _parse(payload) if payload is not None else read()
                if self._closed:
                    break
                if not woke and not done(meta) and stalled():
                    break
            return meta
        finally:
            with self._lock:
                group = self._waiters.get(future_id)
                if group is not None:
                    group.discard(event)
                    if not group:
                        del self._waiters[future_id]
                        self._payloads.pop(future_id, None)
