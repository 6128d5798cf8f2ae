"""Per-tenant limits on a real stack: 429 + Retry-After in the one error envelope, per tenant.

Runs: at most 2 per tenant (not deleted). Ops: at most 3 unfinished per tenant. To hold ops
unfinished the test stops the worker process (SIGSTOP) and lets it go on afterwards
(SIGCONT); the worker's heartbeat record lives 60 s here, so it stays alive meanwhile.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

import eztinker
from config import Settings
from eztinker import RateLimitError, RetryPolicy
from eztinker_tasks import catalog
from eztinker_tasks.store import FutureRecord
from eztinker_tasks.store_records import tenant_runs_key
from eztinker_tasks.tokenization import TokenizerCache
from eztinker_web.futures.status import finished
from eztinker_web.futures.watcher import META_PREFIX
from eztinker_web.services import Services
from tests.conftest import wait_future
from tests.integration.tenant_world import FB, KEYS, TOKENS, World, start_tenant_stack

LIMITS = {
    "EZTINKER_TENANT_MAX_RUNS": "2",
    "EZTINKER_TENANT_MAX_QUEUED_OPS": "3",
    "EZTINKER_WORKER_TTL_S": "60",
}
ENVELOPE = {"code", "status", "category", "message", "errors"}


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[World]:
    world = World(start_tenant_stack(tmp_path_factory.mktemp("limits"), model_cache, LIMITS))
    yield world
    world.close()


@contextmanager
def worker_stopped(w: World) -> Generator[None]:
    """The worker process stopped (it runs nothing; its heartbeat record lives on)."""
    worker = w.svc.processes["worker-cpu0"]
    worker.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        worker.send_signal(signal.SIGCONT)


def assert_429(response, code: str, category: str, retry_after: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == ENVELOPE
    assert (body["code"], body["status"], body["category"]) == (code, 429, category)
    assert response.headers["Retry-After"] == retry_after


def create(w: World, who: str):
    return w.post(who, "/v1/runs", {"base_model": "tiny-gpt2", "rank": 2})


def test_a_tenant_holds_at_most_its_run_limit(w: World) -> None:
    first, second = create(w, "carol"), create(w, "carol")
    assert first.status_code == second.status_code == 201
    refused = create(w, "carol")
    assert_429(refused, "too_many_runs", "user", "30")
    assert "EZTINKER_TENANT_MAX_RUNS=2" in refused.json()["message"]
    # Other tenants have their own count; an admin key has none.
    other = create(w, "bob")
    assert other.status_code == 201
    admin = [create(w, "admin") for _ in range(3)]
    assert [a.status_code for a in admin] == [201, 201, 201]

    # The SDK raises it at once (a user-category 429 is not retried), with Retry-After.
    slow_retry = RetryPolicy(max_retries=3, initial_delay=2.0, max_delay=10.0)
    sdk = eztinker.ServiceClient(w.svc.base_url, api_key=KEYS["carol"], retry=slow_retry)
    started = time.monotonic()
    with pytest.raises(RateLimitError) as raised:
        sdk.create_lora_training_client("tiny-gpt2", rank=2)
    assert time.monotonic() - started < 5  # a retry would have slept 10 s
    assert raised.value.code == "too_many_runs" and raised.value.retry_after == 30
    assert raised.value.status == 429 and raised.value.is_user_error

    # A deleted run frees its place at once; a count that is too high (a run id whose record
    # is gone) is put right when the tenant reaches its limit.
    w.done("carol", first)
    assert w.delete("carol", f"/v1/runs/{first.json()['run_id']}").status_code == 202
    r = redis.Redis.from_url(w.svc.redis_url)
    r.sadd(tenant_runs_key("carol"), "run_ghost")
    third = create(w, "carol")
    assert third.status_code == 201, third.text
    assert not r.sismember(tenant_runs_key("carol"), "run_ghost")
    assert_429(create(w, "carol"), "too_many_runs", "user", "30")
    for made in (second, third, other, *admin):  # an admin key sees (and deletes) every run
        w.done("admin", w.delete("admin", f"/v1/runs/{made.json()['run_id']}"))


def test_a_tenant_has_at_most_its_limit_of_unfinished_ops(w: World) -> None:
    made = create(w, "dave")
    run = made.json()["run_id"]
    w.done("dave", made)
    fb_path = f"/v1/runs/{run}/forward_backward"
    sample = {"base_model": "tiny-gpt2", "prompt_tokens": TOKENS[:3], "max_tokens": 2}
    with worker_stopped(w):
        queued = [w.post("dave", fb_path, FB) for _ in range(3)]
        assert [q.status_code for q in queued] == [202, 202, 202]
        refused = w.post("dave", fb_path, FB)
        assert_429(refused, "too_many_queued_ops", "server", "1")
        assert "EZTINKER_TENANT_MAX_QUEUED_OPS=3" in refused.json()["message"]
        assert_429(w.post("dave", "/v1/sample", sample), "too_many_queued_ops", "server", "1")
        logprobs = {"run_id": run, "tokens": TOKENS}
        assert_429(
            w.post("dave", "/v1/compute_logprobs", logprobs), "too_many_queued_ops", "server", "1"
        )
        # A retry of a submitted op returns its future (nothing new is queued) ...
        again = w.post("dave", fb_path, {**FB, "seq_id": queued[0].json()["seq_id"]})
        assert (
            again.status_code == 202 and again.json()["future_id"] == queued[0].json()["future_id"]
        )
        # ... while a new seq_id is refused without being claimed.
        assert_429(
            w.post("dave", fb_path, {**FB, "seq_id": 100}), "too_many_queued_ops", "server", "1"
        )
        # Other tenants, and admin keys, are not held back by dave's ops.
        theirs = [w.post("bob", "/v1/sample", sample), w.post("admin", fb_path, FB)]
        assert [t.status_code for t in theirs] == [202, 202]

        # The SDK retries a server-category 429 (honouring Retry-After) and gives up with
        # RateLimitError when its retries run out.
        quick = RetryPolicy(max_retries=1, initial_delay=0.05, max_delay=0.1)
        sdk = eztinker.ServiceClient(w.svc.base_url, api_key=KEYS["dave"], retry=quick)
        with pytest.raises(RateLimitError) as raised:
            sdk.create_sampling_client(base_model="tiny-gpt2").sample(TOKENS[:3], 1)
        assert raised.value.code == "too_many_queued_ops" and raised.value.retry_after == 1
        assert raised.value.category == "server"

    for submitted in (*queued, theirs[1]):
        who = "dave" if submitted is not theirs[1] else "admin"
        assert wait_future(w.client(who), submitted.json()["future_id"])["status"] == "succeeded"
    # The finished ops leave the count: seq_id 100 was never claimed, and is taken now.
    accepted = w.post("dave", fb_path, {**FB, "seq_id": 100})
    assert accepted.status_code == 202, accepted.text
    w.done("dave", accepted)

    # A client that keeps retrying gets in once the tenant's ops finish.
    patient = RetryPolicy(max_retries=8, initial_delay=0.2, max_delay=2.0)
    sdk = eztinker.ServiceClient(w.svc.base_url, api_key=KEYS["dave"], retry=patient)
    with worker_stopped(w):
        for _ in range(3):
            assert w.post("dave", fb_path, FB).status_code == 202
        threading.Timer(1.5, w.svc.processes["worker-cpu0"].send_signal, [signal.SIGCONT]).start()
        started = time.monotonic()
        out = sdk.create_sampling_client(base_model="tiny-gpt2").sample(TOKENS[:3], 1)
        assert time.monotonic() - started >= 1.0  # it waited for the worker
    assert len(out.result(timeout=120).sequences) == 1
    w.done("dave", w.delete("dave", f"/v1/runs/{run}"))


def test_finished_ops_leave_the_count(w: World) -> None:
    """``finished`` drops an op that succeeded, expired, or cannot finish (its worker is gone);
    it keeps one that waits for a live worker."""
    svc = Services(
        Settings(redis_url=w.svc.redis_url, data_dir=w.svc.data_dir),
        TokenizerCache(w.svc.data_dir),
    )
    live = w.svc.wait_workers(1)[0]["name"]
    now = time.time()

    def record(future_id: str, worker: str | None, run_id: str | None = "run_x") -> str:
        future = FutureRecord(future_id, "eztinker.forward", "q", now, run_id, 1, worker, "dave")
        svc.redis_client.set(svc.store.future_key(future_id), json.dumps(future.__dict__), ex=60)
        return future_id

    done = record("fut_t_done", live)
    svc.redis_client.set(META_PREFIX + done, json.dumps({"status": "SUCCESS"}), ex=60)
    started_dead = record("fut_t_started_dead", live)
    started = json.dumps({"at": now, "worker": "ghost@nowhere"})
    svc.redis_client.set(svc.store.future_key(started_dead) + ":started", started, ex=60)
    ids = [
        done,
        "fut_t_expired",  # no record: it expired
        record("fut_t_ghost", "ghost@nowhere"),  # its run's worker is gone
        started_dead,  # the worker that started it is gone
        record("fut_t_waiting", live),  # queued for a live worker
        record("fut_t_shared", None, None),  # on the shared queue, with a live worker
    ]
    assert set(finished(svc, ids)) == {done, "fut_t_expired", "fut_t_ghost", started_dead}


def test_tenants_name_only_the_model_directories_allowed(w: World, tmp_path: Path) -> None:
    """A tenant's local base must lie under EZTINKER_MODEL_DIRS (this stack's dir); a
    directory elsewhere, or a path that climbs out of it, is a 400 on every route that takes
    a model name; an admin key may name any directory."""
    tiny = catalog.model_dir("tiny-gpt2", w.svc.data_dir)
    inside = w.svc.data_dir.parent / "allowed-model"
    outside = tmp_path / "elsewhere"
    shutil.copytree(tiny, inside)
    shutil.copytree(tiny, outside)
    climbing = str(inside / ".." / ".." / outside.parent.name / outside.name)
    for name in (str(outside), climbing, "/etc"):
        refused = w.post("dave", "/v1/runs", {"base_model": name, "rank": 4})
        assert refused.status_code == 400, refused.text
        assert "EZTINKER_MODEL_DIRS" in refused.json()["message"]
        sample = w.post("dave", "/v1/sample", {"base_model": name, "prompt_tokens": [5, 6]})
        assert sample.status_code == 400, sample.text
        chat = w.post("dave", "/openai/v1/completions", {"model": name, "prompt": "hi"})
        assert chat.status_code in (400, 404), chat.text
        assert "error" in chat.json()
    for who, name in (("dave", str(inside)), ("admin", str(outside))):
        created = w.post(who, "/v1/runs", {"base_model": name, "rank": 4})
        assert created.status_code == 201, created.text
        assert wait_future(w.client(who), created.json()["future_id"])["status"] == "succeeded"
        w.client(who).delete(f"/v1/runs/{created.json()['run_id']}")
