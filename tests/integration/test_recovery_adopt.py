"""Recovery when the worker does not come back (another worker adopts the run), and an op that
kills its worker each time it runs (it fails after the second crash; the run goes on)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import Service, start_service, wait_future
from tests.integration.test_recovery import assert_same_adapter, tokens_of

ADAM = {"learning_rate": 2e-3}


@pytest.fixture
def stack(tmp_path: Path, model_cache: Path) -> Iterator[Service]:
    env = {"EZTINKER_REHOME_AFTER_S": "2", "EZTINKER_SNAPSHOT_INTERVAL_S": "3600"}
    svc = start_service(tmp_path, model_cache, workers=1, extra_env=env)
    yield svc
    svc.stop()


def _datum(step: int, length: int = 12) -> dict[str, Any]:
    tokens = tokens_of(step, length)
    return {
        "model_input": {"tokens": tokens[:-1]},
        "loss_fn_inputs": {"target_tokens": tokens[1:]},
    }


def _submit(http: httpx.Client, run_id: str, op: str, body: dict[str, Any]) -> str:
    reply = http.post(f"/v1/runs/{run_id}/{op}", json=body)
    assert reply.status_code == 202, reply.text
    return reply.json()["future_id"]


def _step(http: httpx.Client, run_id: str, step: int, heavy: bool = False) -> tuple[str, str]:
    data = [_datum(step + 1000 * i, 256) for i in range(64)] if heavy else [_datum(step)]
    fb = _submit(http, run_id, "forward_backward", {"data": data})
    return fb, _submit(http, run_id, "optim_step", ADAM)


def _create(http: httpx.Client) -> str:
    reply = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4, "seed": 11})
    assert wait_future(http, reply.json()["future_id"])["status"] == "succeeded"
    return reply.json()["run_id"]


def _wait_running(http: httpx.Client, future_id: str) -> None:
    deadline = time.monotonic() + 60
    while http.get(f"/v1/futures/{future_id}").json()["status"] == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _succeeded(http: httpx.Client, futures: list[str]) -> None:
    for f in futures:
        body = wait_future(http, f, timeout=180)
        assert body["status"] == "succeeded", body


def _save(http: httpx.Client, run_id: str, name: str) -> str:
    future = _submit(http, run_id, "save", {"name": name})
    body = wait_future(http, future)
    assert body["status"] == "succeeded", body
    return body["result"]["path"]


def test_a_run_whose_worker_never_comes_back_is_adopted(stack: Service) -> None:
    with stack.http as http:
        reference = _create(http)
        for step in range(6):
            _succeeded(http, list(_step(http, reference, step, heavy=step == 3)))
        expected = _save(http, reference, "final")

        run_id = _create(http)
        for step in range(3):
            _succeeded(http, list(_step(http, run_id, step)))
        in_flight = [*_step(http, run_id, 3, heavy=True), *_step(http, run_id, 4)]
        _wait_running(http, in_flight[0])
        old = stack.processes["worker-cpu0"]
        old.send_signal(signal.SIGKILL)
        old.wait()
        # Its futures wait, saying so, once its heartbeat has lapsed (no worker is left yet).
        deadline = time.monotonic() + 30
        while (waiting := http.get(f"/v1/futures/{in_flight[-1]}").json())["progress"][
            "phase"
        ] != "recovering":
            assert waiting["status"] in ("pending", "running"), waiting
            assert time.monotonic() < deadline, waiting
            time.sleep(0.05)
        # The switch to another launch mode: a worker of another name (honcho's gpu0).
        stack.start_worker("gpu0")
        stack.wait_workers(1)
        shown = http.get(f"/v1/runs/{run_id}").json()
        assert shown["status"] in ("recovering", "ready"), shown
        in_flight += _step(http, run_id, 5)  # submitted while the run is being recovered
        _succeeded(http, in_flight)
        path = _save(http, run_id, "final")
        run = http.get(f"/v1/runs/{run_id}").json()
        assert run["worker"].startswith("gpu0@") and run["status"] == "ready", run
        assert run["step"] == 6, run
    assert_same_adapter(stack.checkpoints_dir, expected, path)


def test_an_op_that_kills_its_worker_twice_fails_and_the_run_goes_on(stack: Service) -> None:
    with stack.http as http:
        run_id = _create(http)
        _succeeded(http, list(_step(http, run_id, 0)))
        deadly, after = _step(http, run_id, 1, heavy=True)
        nxt = _step(http, run_id, 2)
        crashes = redis.Redis.from_url(stack.redis_url)
        deadly_seq = http.get(f"/v1/futures/{deadly}").json()["seq_id"]
        for crash in range(2):  # it is running each time its worker dies
            if crash == 0:
                _wait_running(http, deadly)
            else:  # wait until the recovery runs it again (it counts the crash first)
                deadline = time.monotonic() + 120
                while crashes.hget(f"ezt:run:{run_id}:crashes", str(deadly_seq)) is None:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            time.sleep(0.3)
            proc = stack.processes["worker-cpu0"]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert http.get(f"/v1/futures/{deadly}").json()["status"] in ("pending", "running")
            started = stack.start_worker("cpu0")
            stack.wait_workers(1, pids={started.pid})
        body = wait_future(http, deadly, timeout=180)
        assert body["status"] == "failed", body
        assert body["error"]["code"] == "op_crashed_worker", body
        assert "twice" in body["error"]["message"]
        # The ops after it run on the recovered run: the optim_step of no gradient, then a
        # whole step.
        _succeeded(http, [after, *nxt])
        deadline = time.monotonic() + 60
        while (run := http.get(f"/v1/runs/{run_id}").json())["status"] != "ready":
            assert time.monotonic() < deadline, run
            time.sleep(0.05)
        assert run["step"] == 3, run


def test_a_stopped_worker_loses_its_run_and_hands_over_when_it_resumes(
    tmp_path: Path, model_cache: Path
) -> None:
    """SIGSTOP: the worker looks dead (its heartbeat lapses), another adopts its run; after
    SIGCONT the stopped one applies nothing more to the run (fencing: it hands over)."""
    env = {"EZTINKER_REHOME_AFTER_S": "2", "EZTINKER_SNAPSHOT_INTERVAL_S": "0"}
    svc = start_service(tmp_path, model_cache, workers=2, extra_env=env)
    try:
        with svc.http as http:
            reference = _create(http)
            for step in range(10):
                _succeeded(http, list(_step(http, reference, step)))
            expected = _save(http, reference, "final")
            run_id = _create(http)
            for step in range(3):
                _succeeded(http, list(_step(http, run_id, step)))
            owner = http.get(f"/v1/runs/{run_id}").json()["worker"]
            proc = svc.processes["worker-" + owner.split("@")[0]]
            proc.send_signal(signal.SIGSTOP)
            try:
                pending = [f for step in range(3, 7) for f in _step(http, run_id, step)]
                _succeeded(http, pending)
            finally:
                proc.send_signal(signal.SIGCONT)
            adopter = http.get(f"/v1/runs/{run_id}").json()["worker"]
            assert adopter != owner
            svc.wait_workers(2)  # the stopped worker is back
            for step in range(7, 10):
                _succeeded(http, list(_step(http, run_id, step)))
            path = _save(http, run_id, "final")
            run = http.get(f"/v1/runs/{run_id}").json()
            assert (run["worker"], run["step"], run["status"]) == (adopter, 10, "ready"), run
        assert_same_adapter(svc.checkpoints_dir, expected, path)
    finally:
        svc.stop()


def test_with_no_worker_left_pending_ops_fail_for_good_and_a_later_worker_recovers_the_run(
    stack: Service,
) -> None:
    """The only worker dies and none takes over: after the re-home time and a grace period
    the run's pending ops fail (worker_gone), for good: a worker started later recovers the
    run without applying them."""
    with stack.http as http:
        run_id = _create(http)
        for step in range(2):
            _succeeded(http, list(_step(http, run_id, step)))
        proc = stack.processes["worker-cpu0"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        orphaned = list(_step(http, run_id, 2))
        started = time.monotonic()
        for f in orphaned:
            body = wait_future(http, f, timeout=120)
            assert body["status"] == "failed", body
            assert body["error"]["code"] == "worker_gone", body
            assert "no live worker took over" in body["error"]["message"], body
        assert time.monotonic() - started < 60
        stack.start_worker("gpu0")
        deadline = time.monotonic() + 120
        while (run := http.get(f"/v1/runs/{run_id}").json())["status"] != "ready":
            assert time.monotonic() < deadline, run
            time.sleep(0.1)
        assert run["step"] == 2 and run["worker"].startswith("gpu0@"), run
        for f in orphaned:  # still failed: the recovery did not apply them
            assert http.get(f"/v1/futures/{f}").json()["status"] == "failed"
        _succeeded(http, list(_step(http, run_id, 2)))
        assert http.get(f"/v1/runs/{run_id}").json()["step"] == 3
