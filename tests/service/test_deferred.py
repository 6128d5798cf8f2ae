"""Round trips taken off the worker's critical path, against the real broker.

- ``DeferredReplies``: commands sent at once, replies read later and in order, error replies
  handed back, a dropped connection failing what waits and reconnecting on the next send.
- EZTinker's kombu QoS: a taken message is recorded as unacknowledged exactly as kombu records
  it, the record goes on ack, and an unacknowledged message is restored when the channel closes.
- ``BeginPrefetch``: the start-up round trip sent early answers exactly what ``begin_op`` answers,
  and anything unexpected falls back to asking.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from kombu import Connection

from config import Settings
from eztinker_tasks import names
from eztinker_tasks.applying import coalesce_peek, expected_begin
from eztinker_tasks.deferred import DeferredReplies
from eztinker_tasks.prefetch import BeginPrefetch, BeginSpec
from eztinker_tasks.store import RunRecord, Store
from eztinker_tasks.transport import QoS, Transport
from tests.conftest import Service


@pytest.fixture()
def client(service: Service) -> redis.Redis:
    return redis.Redis.from_url(service.redis_url)


def _key() -> str:
    return f"test:{uuid.uuid4().hex}"


def _kill(client: redis.Redis, replies: DeferredReplies) -> None:
    """Drop ``replies``' connection (and no other: the session's service shares the broker)."""
    name = f"deferred-{uuid.uuid4().hex}"
    replies.send([("CLIENT", "SETNAME", name)]).replies()
    (conn,) = [c for c in client.client_list() if c.get("name") == name]
    client.client_kill_filter(_id=conn["id"])


def test_replies_come_back_in_order_with_error_replies(client: redis.Redis) -> None:
    replies = DeferredReplies(client.connection_pool)
    key, text = _key(), _key()
    client.set(text, "a string")
    first = replies.send([("RPUSH", key, "a"), ("RPUSH", key, "b")])
    second = replies.send([("LRANGE", key, 0, -1), ("LPUSH", text, "x")])  # WRONGTYPE
    third = replies.send([("DEL", key, text)])
    # Reading a later batch reads the earlier ones first.
    assert third.replies() == [2]
    assert first.done and second.done
    assert first.replies() == [1, 2]
    lrange, wrong = second.replies()
    assert lrange == [b"a", b"b"]
    assert isinstance(wrong, redis.ResponseError) and "WRONGTYPE" in str(wrong)
    replies.close()


def test_unread_replies_never_pile_up(client: redis.Redis) -> None:
    replies = DeferredReplies(client.connection_pool)
    key = _key()
    for i in range(500):
        replies.send([("SET", key, str(i))])
        time.sleep(0.0005 if i % 50 == 0 else 0)
    # Each send first reads what has already arrived: only the latest few can be waiting.
    assert len(replies._waiting) < 500
    replies.drain()
    assert not replies._waiting
    assert client.get(key) == b"499"
    client.delete(key)
    replies.close()


def test_a_dropped_connection_fails_what_waits_and_the_next_send_reconnects(
    client: redis.Redis,
) -> None:
    replies = DeferredReplies(client.connection_pool)
    key = _key()
    _kill(client, replies)
    waiting = replies.send([("SET", key, "1")])
    with pytest.raises(redis.ConnectionError):
        waiting.replies()
    assert replies.send([("SET", key, "2")]).replies() == [b"OK"]
    assert client.get(key) == b"2"
    client.delete(key)
    replies.close()


def test_replies_owed_survive_the_pools_health_check(service: Service) -> None:
    # kombu's pool checks a connection's health (PING) when it has been idle a while; that
    # PING must not be sent (and its answer read) while a reply is still owed to a batch.
    pool = redis.ConnectionPool.from_url(service.redis_url, health_check_interval=1)
    replies = DeferredReplies(pool)
    empty, key = _key(), _key()
    first = replies.send([("BLPOP", empty, 2)])  # answers in 2 s
    time.sleep(1.5)  # past the health-check interval, the reply still owed
    second = replies.send([("SET", key, "1")])
    assert first.replies() == [None]
    assert second.replies() == [b"OK"]
    redis.Redis(connection_pool=pool).delete(key)
    replies.close()


def _kombu(service: Service) -> Connection:
    return Connection(service.redis_url, transport=Transport)


def test_taken_message_is_recorded_unacked_until_acked(service: Service) -> None:
    queue_name = f"test.{uuid.uuid4().hex}"
    client = redis.Redis.from_url(service.redis_url)
    with _kombu(service) as conn:
        queue = conn.SimpleQueue(queue_name)
        queue.put({"n": 1})
        message = queue.get(timeout=5)
        qos = message.channel.qos
        assert isinstance(qos, QoS)
        qos.settle()
        tag = message.delivery_tag
        record = client.hget("unacked", tag)
        assert record is not None
        assert json.loads(record)[0]["body"] == message._raw["body"]  # kombu's own format
        assert client.zscore("unacked_index", tag) is not None
        message.ack()
        qos.settle()
        assert client.hget("unacked", tag) is None
        assert client.zscore("unacked_index", tag) is None
        queue.close()


def test_unacked_message_is_restored_when_the_channel_closes(service: Service) -> None:
    queue_name = f"test.{uuid.uuid4().hex}"
    with _kombu(service) as conn:
        queue = conn.SimpleQueue(queue_name)
        queue.put({"n": 2})
        taken = queue.get(timeout=5)
        assert taken.payload == {"n": 2}
        queue.close()  # not acked
    with _kombu(service) as conn:
        queue = conn.SimpleQueue(queue_name)
        again = queue.get(timeout=5)
        assert again.payload == {"n": 2}
        again.ack()
        queue.close()


def test_prefetched_begin_answers_what_begin_op_answers(client: redis.Redis) -> None:
    store = Store(client, ttl_s=60)
    run_id = f"run_{uuid.uuid4().hex}"
    queue = names.run_queue(run_id)
    client.rpush(queue, b"m3", b"m2", b"m1")  # oldest last
    client.hset(f"ezt:run:{run_id}:applied", "7", "fut_first")
    # The run's owner comes back with every run op (a worker it moved away from hands over).
    store.put_run(RunRecord(run_id, "tiny-gpt2", {}, worker="w0", created_at=0.0))
    replies = DeferredReplies(client.connection_pool)
    prefetch = BeginPrefetch(store, replies)

    applied = BeginSpec.of("fut_a", run_id, 7, 2)
    prefetch.send(applied, "w1")
    assert prefetch.begin(applied, "w1") == ("fut_first", [b"m2", b"m1"], "w0")
    assert store.begin_op("fut_b", "w1", run_id, 7, (queue, 2)) == (
        "fut_first",
        [b"m2", b"m1"],
        "w0",
    )
    started = store.started("fut_a")
    assert started is not None and started["worker"] == "w1"

    # Sent for other parameters than the task asks: the task asks itself.
    prefetch.send(BeginSpec.of("fut_c", run_id, 8, 0), "w1")
    assert prefetch.begin(BeginSpec.of("fut_c", run_id, 7, 1), "w1") == ("fut_first", [b"m1"], "w0")
    # Never sent: asked directly.
    assert prefetch.begin(BeginSpec.of("fut_d", run_id, 9, 0), "w1") == (None, [], "w0")
    # A broken connection: asked again on the store's own connection.
    _kill(client, replies)  # the prefetch's connection dies unnoticed
    prefetch.send(BeginSpec.of("fut_e", run_id, 7, 0), "w1")
    assert prefetch.begin(BeginSpec.of("fut_e", run_id, 7, 0), "w1") == ("fut_first", [], "w0")
    client.delete(queue, f"ezt:run:{run_id}:applied", f"ezt:run:{run_id}", "ezt:runs")


def test_expected_begin_is_what_each_task_asks() -> None:
    settings = Settings.from_env({})
    peek = coalesce_peek(settings, 3)
    cases = [
        (names.FORWARD, {"run_id": "r", "seq_id": 3}, BeginSpec.of("f", "r", 3, peek)),
        (names.FORWARD_BACKWARD, {"run_id": "r", "seq_id": 3}, BeginSpec.of("f", "r", 3, peek)),
        (names.OPTIM_STEP, {"run_id": "r", "seq_id": 4}, BeginSpec.of("f", "r", 4, 0)),
        (names.SAVE, {"run_id": "r", "seq_id": 5, "name": "c"}, BeginSpec.of("f", "r", 5, 0)),
        (names.CREATE_RUN, {"run_id": "r", "base_model": "m"}, BeginSpec("f")),
        (names.SAMPLE, {"source": {"run_id": "r"}}, BeginSpec("f")),
        (names.DELETE_RUN, {"run_id": "r"}, BeginSpec("f")),
    ]
    for name, kwargs, spec in cases:
        assert expected_begin(name, "f", kwargs, settings) == spec, name
