"""Run records written by many writers at once (web threads, workers), against the real broker."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from eztinker_tasks.store import RunRecord, Store
from tests.conftest import Service


@pytest.fixture()
def store(service: Service) -> Store:
    return Store(redis.Redis.from_url(service.redis_url))


def _run(store: Store) -> str:
    run_id = f"run_test{uuid.uuid4().hex}"
    store.put_run(RunRecord(run_id, "tiny-gpt2", {}, "old@host", time.time()))
    return run_id


def test_concurrent_updates_of_different_fields_are_all_kept(store: Store) -> None:
    run_id = _run(store)
    fields = ["last_state", "base_model", "worker", "error"]
    start = threading.Barrier(len(fields))

    def write(field: str) -> None:
        start.wait()
        for i in range(300):
            store.update_run(run_id, **{field: f"{field}-{i}"})

    with ThreadPoolExecutor(len(fields)) as pool:
        list(pool.map(write, fields))
    record = store.get_run(run_id)
    assert record is not None
    assert [getattr(record, f) for f in fields] == [f"{f}-299" for f in fields]


def test_a_run_moves_once_however_many_requests_move_it(store: Store) -> None:
    run_id = _run(store)
    start = threading.Barrier(8)

    def move(i: int) -> tuple[str, bool]:
        start.wait()
        record, moved = store.move_run(run_id, "old@host", f"new{i}@host")
        return record.worker, moved

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(move, range(8)))
    assert sum(moved for _, moved in outcomes) == 1
    winner = next(worker for worker, moved in outcomes if moved)
    assert {worker for worker, _ in outcomes} == {winner}
    record = store.get_run(run_id)
    assert record is not None and record.worker == winner


def test_an_op_finishing_after_its_run_was_deleted_does_not_bring_it_back(store: Store) -> None:
    """DELETE while the create (or any op) is still running: the op's "ready" stats must not
    revive the run in listings (seen as leftover runs after fuzzing run creation)."""
    deleted, alive = _run(store), _run(store)
    store.update_run(deleted, status="deleted")
    for run_id in (deleted, alive):
        with store.r.pipeline() as pipe:
            store.finish_op(run_id, 1, "fut_x", pipe, status="ready", step=3, error=None)
            pipe.execute()
    gone, kept = store.get_run(deleted), store.get_run(alive)
    assert gone is not None and gone.status == "deleted"
    assert kept is not None and kept.status == "ready" and kept.step == 3
