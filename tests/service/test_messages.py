"""Task messages the web process queues itself, in the submit script's one round trip.

They must be exactly what Celery's own ``send_task`` would queue (the worker cannot tell them
apart), the script must write the seq_id it picks into them, and a submit that is refused must
queue nothing.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import pytest
import redis

from config import Settings
from eztinker_tasks import names
from eztinker_tasks.celery_app import make_celery
from eztinker_tasks.coalesce import peek_followers
from eztinker_tasks.errors import Conflict, UnknownRun
from eztinker_tasks.messages import task_message
from eztinker_tasks.store import FutureRecord, RunRecord, Store
from tests.conftest import Service

KWARGS = {
    "run_id": "run_x",
    "data": [{"tokens": [1, 2], "loss_fn_inputs": {"target_tokens": [2, 3], "weights": [0.1, 1]}}],
    "loss_fn": "cross_entropy",
    "loss_fn_config": {},
}


def _decoded(raw: bytes | str) -> tuple[dict[str, Any], list[Any]]:
    envelope = json.loads(raw)
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return envelope, json.loads(body)


@pytest.fixture()
def client(service: Service) -> redis.Redis:
    return redis.Redis.from_url(service.redis_url)


def test_message_matches_what_send_task_queues(service: Service, client: redis.Redis) -> None:
    app = make_celery(Settings.from_env({}), service.redis_url)
    queue = f"test.{uuid.uuid4().hex}"
    app.send_task(
        names.FORWARD,
        kwargs=KWARGS,
        task_id="fut_same",
        queue=queue,
        argsrepr="()",
        kwargsrepr="{run_id: 'run_x'}",
    )
    (celerys,) = client.lrange(queue, 0, -1)
    client.delete(queue)
    ours = task_message(app, names.FORWARD, "fut_same", KWARGS, queue)

    theirs_env, theirs_body = _decoded(celerys)
    ours_env, ours_body = _decoded(ours.payload)
    assert ours.queue == queue
    assert ours_body == theirs_body  # [args, kwargs, embed]
    for key in ("content-type", "content-encoding"):
        assert ours_env[key] == theirs_env[key]
    assert ours_env["headers"] == theirs_env["headers"]
    volatile = {"delivery_tag", "body_encoding"}
    assert {k: v for k, v in ours_env["properties"].items() if k not in volatile} == {
        k: v for k, v in theirs_env["properties"].items() if k not in volatile
    }


def _run(store: Store) -> str:
    run_id = f"run_{uuid.uuid4().hex}"
    store.put_run(RunRecord(run_id, "tiny-gpt2", {}, "w", time.time(), status="ready"))
    return run_id


def _submit(store: Store, app: Any, run_id: str, seq_id: int | None, body: dict[str, Any]):
    future = FutureRecord(f"fut_{uuid.uuid4().hex}", names.FORWARD, "q", time.time(), run_id)
    message = task_message(
        app, names.FORWARD, future.future_id, {"run_id": run_id, **body}, names.run_queue(run_id),
        with_seq=True,
    )  # fmt: skip
    return store.submit_op(run_id, seq_id, json.dumps(body), future, message)


def test_submit_writes_its_seq_id_into_the_queued_message(
    service: Service, client: redis.Redis
) -> None:
    app = make_celery(Settings.from_env({}), service.redis_url)
    store = Store(client)
    run_id = _run(store)
    queue = names.run_queue(run_id)
    claims = [_submit(store, app, run_id, None, {"data": KWARGS["data"]}) for _ in range(3)]
    claims.append(_submit(store, app, run_id, 10, {"data": KWARGS["data"]}))
    assert [c.seq_id for c in claims] == [1, 2, 3, 10]
    # newest first
    queued: list[bytes] = list(client.lrange(queue, 0, -1))  # ty: ignore[invalid-assignment]
    seqs = [_decoded(raw)[1][1]["seq_id"] for raw in reversed(queued)]
    assert seqs == [1, 2, 3, 10]
    # The coalescing parser reads them like messages Celery queued.
    followers = peek_followers(
        queued, names.FORWARD, run_id, "cross_entropy", None,
        max_tokens=100, already_applied=lambda seq: False,
    )  # fmt: skip
    assert [f.seq_id for f in followers] == [1, 2, 3, 10]
    first = store.get_future(claims[0].future_id)
    assert first is not None and first.seq_id == 1

    # A resent seq_id with the same body returns the first future and queues nothing more;
    # another body is a conflict.
    again = _submit(store, app, run_id, 2, {"data": KWARGS["data"]})
    assert (again.created, again.future_id) == (False, claims[1].future_id)
    with pytest.raises(Conflict):
        _submit(store, app, run_id, 2, {"data": []})
    assert client.llen(queue) == 4
    client.delete(queue)


def test_refused_submit_queues_nothing(service: Service, client: redis.Redis) -> None:
    app = make_celery(Settings.from_env({}), service.redis_url)
    store = Store(client)
    with pytest.raises(UnknownRun):
        _submit(store, app, "run_never", None, {"data": []})
    assert client.llen(names.run_queue("run_never")) == 0
    run_id = _run(store)
    store.update_run(run_id, status="deleted")
    with pytest.raises(UnknownRun):
        _submit(store, app, run_id, None, {"data": []})
    assert client.llen(names.run_queue(run_id)) == 0
    assert store.last_seq(run_id) == 0
