"""Sticky routing and ordering: a run's ops run on its recorded worker, one at a time, in order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import Service, result_of, start_service, wait_future

TOKENS = [5, 17, 42, 99, 7, 300, 12, 64, 8, 250]
FB = {"input_ids": TOKENS, "target_ids": TOKENS}


def _meta(svc: Service, future_id: str) -> dict:
    raw = redis.Redis.from_url(svc.redis_url).get(f"celery-task-meta-{future_id}")
    assert raw is not None
    return json.loads(raw)


def _executed_on(svc: Service, future_id: str) -> str:
    """The worker that ran an operation, as it recorded when it started it."""
    raw = redis.Redis.from_url(svc.redis_url).get(f"ezt:future:{future_id}:started")
    assert raw is not None
    return json.loads(raw)["worker"]


def _create(http: httpx.Client, **body) -> str:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, **body})
    result_of(http, created)
    return created.json()["run_id"]


def test_pipelined_ops_execute_in_submission_order(service: Service, http: httpx.Client) -> None:
    pipelined, sequential = _create(http, seed=11), _create(http, seed=11)
    futures = []
    for _ in range(5):  # submit everything first, wait afterwards
        futures.append(("fb", http.post(f"/v1/runs/{pipelined}/forward_backward", json=FB).json()))
        futures.append(
            (
                "opt",
                http.post(f"/v1/runs/{pipelined}/optim_step", json={"learning_rate": 1e-2}).json(),
            )
        )
    seq_ids = [f["seq_id"] for _, f in futures]
    assert seq_ids == sorted(seq_ids) and len(set(seq_ids)) == len(seq_ids)
    results = [(kind, wait_future(http, f["future_id"])) for kind, f in futures]
    assert all(r["status"] == "succeeded" for _, r in results), results
    steps = [r["result"]["metrics"]["step"] for kind, r in results if kind == "opt"]
    assert steps == [1, 2, 3, 4, 5]
    done = [_meta(service, f["future_id"])["date_done"] for _, f in futures]
    assert done == sorted(done)
    # The same ops, one at a time, on a twin run: identical numbers prove the order.
    reference = []
    for _ in range(5):
        reference.append(
            result_of(http, http.post(f"/v1/runs/{sequential}/forward_backward", json=FB))[
                "metrics"
            ]["loss:sum"]
        )
        result_of(
            http, http.post(f"/v1/runs/{sequential}/optim_step", json={"learning_rate": 1e-2})
        )
    losses = [r["result"]["metrics"]["loss:sum"] for kind, r in results if kind == "fb"]
    assert losses == reference
    assert len(set(losses)) == 5


def test_two_runs_on_one_worker_are_isolated(http: httpx.Client) -> None:
    a, b = _create(http, seed=1), _create(http, seed=1)
    probe = {"prompt_tokens": TOKENS[:3], "max_tokens": 6, "temperature": 0.0}
    before_b = result_of(http, http.post("/v1/sample", json={**probe, "run_id": b}))
    base_before = result_of(
        http, http.post("/v1/compute_logprobs", json={"tokens": TOKENS, "base_model": "tiny-gpt2"})
    )
    for _ in range(3):
        http.post(f"/v1/runs/{a}/forward_backward", json=FB)
        result_of(http, http.post(f"/v1/runs/{a}/optim_step", json={"learning_rate": 5e-2}))
    after_b = result_of(http, http.post("/v1/sample", json={**probe, "run_id": b}))
    base_after = result_of(
        http, http.post("/v1/compute_logprobs", json={"tokens": TOKENS, "base_model": "tiny-gpt2"})
    )
    assert after_b == before_b
    assert base_after == base_before
    assert http.get(f"/v1/runs/{a}").json()["step"] == 3
    assert http.get(f"/v1/runs/{b}").json()["step"] == 0


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Service]:
    # Recovery off: these tests check the manual path (tests/integration/test_recovery*.py
    # check automatic recovery).
    svc = start_service(
        tmp_path_factory.mktemp("two"), model_cache, workers=2, extra_env={"EZTINKER_RECOVERY": "0"}
    )
    yield svc
    svc.stop()


def test_runs_are_pinned_to_their_recorded_worker(two_workers: Service) -> None:
    with two_workers.http as http:
        runs = [_create(http, seed=i) for i in range(4)]
        recorded = {r: http.get(f"/v1/runs/{r}").json()["worker"] for r in runs}
        assert len(set(recorded.values())) == 2  # spread over both workers
        futures = []
        for _ in range(3):
            for r in runs:
                futures.append((r, http.post(f"/v1/runs/{r}/forward_backward", json=FB).json()))
                futures.append(
                    (
                        r,
                        http.post(
                            "/v1/sample",
                            json={"run_id": r, "prompt_tokens": [1, 2], "max_tokens": 2},
                        ).json(),
                    )
                )
        for r, f in futures:
            assert wait_future(http, f["future_id"])["status"] == "succeeded"
            assert _executed_on(two_workers, f["future_id"]) == recorded[r]
        health = http.get("/health").json()
        held = {w["name"]: set(w["runs"]) for w in health["workers"]}
        for r, worker in recorded.items():
            assert r in held[worker]
        # Base-model sampling goes to the shared queue, which both workers serve.
        for _ in range(2):
            out = http.post("/v1/sample", json={"prompt_tokens": [1, 2], "max_tokens": 2})
            assert wait_future(http, out.json()["future_id"])["status"] == "succeeded"


def test_future_of_dead_worker_fails_clearly_and_restart_rebinds(two_workers: Service) -> None:
    with two_workers.http as http:
        run_id = _create(http, seed=7)
        worker = http.get(f"/v1/runs/{run_id}").json()["worker"]
        saved = result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "s1"}))
        key = "worker-" + worker.split("@")[0]
        proc = two_workers.processes[key]
        proc.kill()
        proc.wait()
        pending = http.post(f"/v1/runs/{run_id}/forward_backward", json=FB).json()
        body = wait_future(http, pending["future_id"], timeout=60)
        assert body["status"] == "failed"
        assert body["error"]["category"] == "server"
        assert worker in body["error"]["message"]

        restarted = two_workers.start_worker(worker.split("@")[0])
        two_workers.wait_workers(2, pids={restarted.pid})
        # The restarted worker re-bound the run's queue; its in-memory state is gone, so
        # training ops fail with a clear message until the state is loaded again.
        info = http.get(f"/v1/runs/{run_id}").json()
        assert info["status"] == "lost" and "restarted" in info["error"]
        assert saved["path"] in info["error"] and "load_state" not in info["error"]
        lost = http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-3})
        body = wait_future(http, lost.json()["future_id"])
        assert body["status"] == "failed" and body["error"]["code"] == "run_state_lost"
        message = body["error"]["message"]
        # Worded for every client (curl, CLI, SDK alike): no SDK call.
        assert f"load its last saved state ({saved['path']})" in message, message
        assert "load_state" not in message
        result_of(http, http.post(f"/v1/runs/{run_id}/load", json={"path": saved["path"]}))
        fb = http.post(f"/v1/runs/{run_id}/forward_backward", json=FB)
        assert result_of(http, fb)["metrics"]["loss:sum"] > 0
        info = http.get(f"/v1/runs/{run_id}").json()
        assert (info["status"], info["error"]) == ("ready", None)  # no stale error


def _running_on(svc: Service, http: httpx.Client, future_id: str, timeout: float = 60) -> str:
    """Wait until the operation has started; the worker running it."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/futures/{future_id}").json()
        assert body["status"] in ("pending", "running"), body
        if body["status"] == "running":
            return _executed_on(svc, future_id)
        time.sleep(0.02)
    raise AssertionError(f"{future_id} never started")


def test_operation_in_flight_fails_when_its_worker_dies_or_restarts(two_workers: Service) -> None:
    # A long base-model sample runs on whichever worker took it from the shared queue: when
    # that worker dies, the future fails (the other worker is alive, so "any worker alive"
    # is not enough); when it restarts under the same name, the operation is lost too.
    long_sample = {"prompt": "a", "num_samples": 16, "max_tokens": 900, "temperature": 1.0}
    with two_workers.http as http:
        for restart in (False, True):
            fut = http.post("/v1/sample", json=long_sample).json()["future_id"]
            worker = _running_on(two_workers, http, fut)
            name = worker.split("@")[0]
            proc = two_workers.processes["worker-" + name]
            proc.kill()
            proc.wait()
            if restart:
                restarted = two_workers.start_worker(name)
                two_workers.wait_workers(2, pids={restarted.pid})
            body = wait_future(http, fut, timeout=60)
            assert body["status"] == "failed", body
            assert body["error"]["code"] == "worker_gone"
            assert worker in body["error"]["message"]
            assert ("restarted" if restart else "died") in body["error"]["message"]
            if not restart:
                restarted = two_workers.start_worker(name)
                two_workers.wait_workers(2, pids={restarted.pid})
