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
