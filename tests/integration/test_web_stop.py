"""Stopping the web process while clients long-poll: they get an answer at once, and the
process exits promptly instead of being killed after gunicorn's graceful timeout."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from eztinker_tasks.store import FutureRecord, QueuedMessage, Store
from tests.conftest import start_service


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_long_polls_answer_when_the_web_stops(
    tmp_path: Path, model_cache: Path, sig: signal.Signals
) -> None:
    svc = start_service(tmp_path, model_cache)
    try:
        # A future whose message sits on a queue no worker serves: it stays pending.
        store = Store(redis.Redis.from_url(svc.redis_url))
        future_id = f"fut_{uuid.uuid4().hex}"
        future = FutureRecord(future_id, "eztinker.sample", "test.idle", time.time())
        store.queue_op(future, QueuedMessage("test.idle", "{}", ""))
        answer: dict[str, Any] = {}

        def long_poll() -> None:
            with svc.http as http:
                reply = http.get(f"/v1/futures/{future.future_id}", params={"wait": 30})
                answer["status"] = reply.json()["status"]

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(1.5)  # the long-poll is waiting
        assert poller.is_alive()
        web = svc.processes["web"]
        t0 = time.monotonic()
        web.send_signal(sig)
        web.wait(30)
        stopped_in = time.monotonic() - t0
        poller.join(5)
        assert answer == {"status": "pending"}
        assert stopped_in < 5, f"the web process took {stopped_in:.1f} s to stop"
        assert svc.logs is not None
        assert "SIGKILL" not in (svc.logs / "web.log").read_text()
    finally:
        svc.stop()


def test_closed_watcher_answers_waiting_long_polls_at_once(tmp_path: Path) -> None:
    from eztinker_tasks.broker import EmbeddedBroker
    from eztinker_web.futures.watcher import ResultWatcher

    broker = EmbeddedBroker(tmp_path)
    watcher = ResultWatcher(redis.Redis.from_url(broker.start().url))
    try:
        out: dict[str, Any] = {}

        def wait() -> None:
            t0 = time.monotonic()
            out["meta"] = watcher.wait(
                "fut_never",
                read=lambda: {"status": "PENDING"},
                done=lambda meta: meta["status"] == "SUCCESS",
                timeout_s=30,
                stalled=lambda: False,
            )
            out["s"] = time.monotonic() - t0

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.5)
        watcher.close()
        waiter.join(5)
        assert out["meta"] == {"status": "PENDING"} and out["s"] < 2
    finally:
        broker.stop()
