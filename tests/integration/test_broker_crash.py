"""The embedded broker survives a kill -9 of itself: no queued operation, future or run record
is lost (append-only file, written before every reply: see ``eztinker_tasks.broker``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port, result_of
from tests.integration.procs import descendants, end, stack_env, start_server


def _submit(http: httpx.Client, path: str, body: dict[str, Any]) -> str:
    response = http.post(path, json=body)
    assert response.status_code == 202, response.text
    return response.json()["future_id"]


def _wait(http: httpx.Client, future_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"future {future_id} hung"
        try:
            body = http.get(f"/v1/futures/{future_id}", params={"wait": 5}).json()
        except (httpx.HTTPError, ValueError):  # the web may answer 503 while the broker is down
            time.sleep(0.5)
            continue
        if body.get("status") in ("succeeded", "failed"):
            return body
        time.sleep(0.2)


def test_a_killed_broker_loses_no_queued_op_or_future(tmp_path: Path, model_cache: Path) -> None:
    env = stack_env(tmp_path, model_cache)
    server = start_server(env, tmp_path, free_port())
    ours: set[int] = set()
    try:
        server.wait_ready()
        ours = descendants(server.process.pid) | {server.broker_pid()}
        with httpx.Client(base_url=server.base, timeout=60) as http:
            created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 1})
            run = result_of(http, created)["run_id"]
            # A long sample holds the worker; the training ops queue behind it in Redis.
            long = {"run_id": run, "prompt_tokens": [1], "max_tokens": 1000, "num_samples": 8,
                    "stop": []}  # fmt: skip
            first = _submit(http, "/v1/sample", long)
            datum = {"model_input": {"tokens": [5, 6, 7]},
                     "loss_fn_inputs": {"target_tokens": [6, 7, 8]}}  # fmt: skip
            queued = []
            for _ in range(3):
                queued.append(_submit(http, f"/v1/runs/{run}/forward_backward", {"data": [datum]}))
                queued.append(_submit(http, f"/v1/runs/{run}/optim_step", {"learning_rate": 1e-3}))
            broker_pid = server.broker_pid()
            os.kill(broker_pid, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while server.broker_pid() == broker_pid:
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.2)
            ours.add(server.broker_pid())
            bodies = [_wait(http, f) for f in [first, *queued]]
            assert [b["status"] for b in bodies] == ["succeeded"] * len(bodies), bodies
            shown = http.get(f"/v1/runs/{run}").json()
            assert shown["status"] == "ready" and shown["step"] == 3, shown
    finally:
        end(ours | descendants(server.process.pid) | server.kill())
