"""The worker's progress publisher against a real Redis: what it writes, when, and what it never
does (touch Redis for a short operation, or let a Redis failure reach the operation)."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from eztinker_tasks.progress import ProgressPublisher, progress_key
from eztinker_tasks.types import OpProgress
from tests.conftest import Service, free_port


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def test_publishes_long_operations_only_and_cleans_up(service: Service) -> None:
    client = redis.Redis.from_url(service.redis_url)
    publisher = ProgressPublisher(client, delay_s=1.0, interval_s=0.05, ttl_s=60)
    long, follower = progress_key("fut_long"), progress_key("fut_follower")
    try:
        # Shorter than delay_s: not one key is written.
        with publisher.track(["fut_short"]) as report:
            report(OpProgress("forward", tokens_total=10, sequences=1))
        time.sleep(0.3)
        assert client.exists(progress_key("fut_short")) == 0

        with publisher.track(["fut_long", "fut_follower"]) as report:
            began = time.monotonic()
            report(OpProgress("decode", tokens_done=0, tokens_total=50, sequences=2))
            time.sleep(0.2)
            if time.monotonic() - began < 0.9:  # (unless this thread was held up that long)
                assert client.exists(long) == 0  # still under delay_s
            assert eventually(lambda: client.exists(long) == 1)
            assert time.monotonic() - began >= 1.0
            first = client.hgetall(long)
            assert first[b"phase"] == b"decode" and first[b"tokens_done"] == b"0"
            assert b"sequences_finished" not in first  # unknown: left out
            assert client.hgetall(follower) == first
            assert 0 < client.ttl(long) <= 60
            report(OpProgress("decode", tokens_done=7, tokens_total=50, sequences=2,
                              sequences_finished=1))  # fmt: skip
            assert eventually(lambda: client.hget(long, "tokens_done") == b"7")
            later = client.hgetall(long)
            assert later[b"sequences_finished"] == b"1"
            assert later[b"started_at"] == first[b"started_at"]
            assert float(later[b"updated_at"]) > float(first[b"updated_at"])
        # Ended: both reports are deleted (by the publisher's thread, on its next tick).
        assert eventually(lambda: client.exists(long, follower) == 0)
    finally:
        publisher.close()


def test_a_redis_failure_never_reaches_the_operation() -> None:
    gone = redis.Redis(host="127.0.0.1", port=free_port(), socket_timeout=0.2)
    publisher = ProgressPublisher(gone, delay_s=0.0, interval_s=0.05)
    try:
        began = time.monotonic()
        with publisher.track(["fut_x"]) as report:
            for step in range(20):
                report(OpProgress("decode", tokens_done=step, tokens_total=20))
                time.sleep(0.01)
        assert time.monotonic() - began < 1.0  # the operation never waited for Redis
        time.sleep(0.3)
        assert publisher._thread is not None and publisher._thread.is_alive()
    finally:
        publisher.close()
