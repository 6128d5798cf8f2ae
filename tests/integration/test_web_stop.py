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


def test_an_openai_stream_ends_and_its_generation_stops_when_the_web_stops(
    tmp_path: Path, model_cache: Path
) -> None:
    """Ctrl-C while a client streams a long completion: the stream ends at once with an error
    event and ``[DONE]`` (it was cut after gunicorn's 10 s graceful timeout, with no end), and
    the generation is cancelled (the worker decoded on for nobody, and, still busy when the
    server stopped it, was killed before it could snapshot its runs)."""
    import httpx

    from eztinker_tasks import token_stream

    svc = start_service(tmp_path, model_cache)
    try:
        body = {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 1000, "n": 128,
                "seed": 1, "stream": True}  # fmt: skip
        lines: list[str] = []
        ended: dict[str, float] = {}

        def consume() -> None:
            url = svc.base_url + "/openai/v1/completions"
            try:
                with httpx.stream("POST", url, json=body, timeout=60) as response:
                    for line in response.iter_lines():
                        if line:
                            lines.append(line)
            except httpx.HTTPError as exc:
                lines.append(f"cut: {exc!r}")
            ended["at"] = time.monotonic()

        reader = threading.Thread(target=consume)
        reader.start()
        deadline = time.monotonic() + 30
        while not any(line.startswith("data: {") for line in lines):
            assert time.monotonic() < deadline and reader.is_alive(), lines
            time.sleep(0.05)
        assert reader.is_alive(), "the generation ended before the web was stopped"
        first = next(line for line in lines if line.startswith("data: {"))
        future_id = "fut_" + first.split('"id":"cmpl-', 1)[1].split('"', 1)[0]
        web = svc.processes["web"]
        t0 = time.monotonic()
        web.send_signal(signal.SIGINT)
        web.wait(30)
        stopped_in = time.monotonic() - t0
        reader.join(10)
        assert not reader.is_alive()
        assert ended["at"] - t0 < 5, f"the stream ended {ended['at'] - t0:.1f} s after Ctrl-C"
        assert stopped_in < 5, f"the web process took {stopped_in:.1f} s to stop"
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert '"code":"service_unavailable"' in lines[-2].replace(" ", ""), lines[-2]
        assert redis.Redis.from_url(svc.redis_url).exists(token_stream.cancel_key(future_id))
        assert svc.logs is not None
        worker_logs = [p for p in svc.logs.iterdir() if p.name.startswith("worker")]
        deadline = time.monotonic() + 20
        while True:  # the worker ends the request at its next decode step
            logged = "".join(p.read_text() for p in worker_logs)
            if f"{future_id}] failed: user error cancelled" in logged:
                break
            assert time.monotonic() < deadline, logged[-2000:]
            time.sleep(0.1)
    finally:
        svc.stop()


def test_an_openai_completion_answers_503_when_the_web_stops(
    tmp_path: Path, model_cache: Path
) -> None:
    """Ctrl-C while a client waits for a long (not streamed) completion: it gets OpenAI's error
    object, 503 (send it again), at once; it got no answer at all (the connection was dropped
    after gunicorn's 10 s graceful timeout, the view polling its future in a hot loop)."""
    import httpx

    svc = start_service(tmp_path, model_cache)
    try:
        body = {"model": "tiny-gpt2", "prompt": "x", "max_tokens": 1000, "n": 128, "seed": 1}
        answer: dict[str, Any] = {}

        def wait() -> None:
            url = svc.base_url + "/openai/v1/completions"
            try:
                reply = httpx.post(url, json=body, timeout=60)
                answer["reply"] = (reply.status_code, reply.json())
            except httpx.HTTPError as exc:
                answer["reply"] = repr(exc)
            answer["at"] = time.monotonic()

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(2.0)  # the generation is under way
        assert waiter.is_alive(), answer
        web = svc.processes["web"]
        t0 = time.monotonic()
        web.send_signal(signal.SIGINT)
        web.wait(30)
        waiter.join(10)
        assert answer["at"] - t0 < 5, f"answered {answer['at'] - t0:.1f} s after Ctrl-C"
        status, error = answer["reply"]
        assert status == 503 and error["error"]["code"] == "service_unavailable", error
    finally:
        svc.stop()
