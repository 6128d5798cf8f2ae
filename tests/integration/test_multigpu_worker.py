"""A multi-rank worker under the real stack (2 CPU ranks on gloo, tiny-llama): it trains,
samples, saves and loads like a one-device worker and gives the same numbers; placement refuses
a base no worker can hold, saying what to start; killing one of its ranks fails its futures
within seconds while another worker keeps serving.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, result_of, start_service, wait_future

TOKENS = [5, 9, 17, 33, 2, 8, 11, 40, 41]
DATA = {
    "data": [
        {"model_input": {"tokens": TOKENS[:6]}, "loss_fn_inputs": {"target_tokens": TOKENS[1:7]}},
        {
            "model_input": {"tokens": TOKENS[2:]},
            "loss_fn_inputs": {"target_tokens": [*TOKENS[3:], 0]},
        },
        {"model_input": {"tokens": [7, 7, 7]}, "loss_fn_inputs": {"target_tokens": [7, 7, 0]}},
    ]
}
PROMPT = {"prompt_tokens": [5, 9, 17], "max_tokens": 6, "temperature": 0.0}


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Service]:
    svc = start_service(
        tmp_path_factory.mktemp("multigpu"), model_cache, workers=0,
        extra_env={"EZTINKER_RECOVERY": "0"},
    )  # fmt: skip
    try:
        svc.start_worker("multi", "--ranks", "2")
        svc.wait_workers(1)
        with svc.http as http:  # a run of the multi-rank worker for the kill test
            created = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4})
            result_of(http, created)
        yield svc
    finally:
        svc.stop()


def _train(http: httpx.Client, run_id: str) -> dict:
    fb = result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json=DATA))
    result_of(http, http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2}))
    after = result_of(http, http.post(f"/v1/runs/{run_id}/forward", json=DATA))
    sample = result_of(http, http.post("/v1/sample", json={**PROMPT, "run_id": run_id}))
    return {"fb": fb, "after": after, "sample": sample}


def _logprobs(out: dict) -> list[float]:
    return [x for o in out["loss_fn_outputs"] for x in o["logprobs"]]


def test_a_stream_cancelled_on_rank_zero_ends_on_every_rank(stack: Service) -> None:
    """Only rank 0 streams: a client that goes away ends the request on all ranks together,
    and the worker stays in step (the next sample succeeds)."""
    with stack.http as http:
        created = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4, "seed": 3})
        run_id = created.json()["run_id"]
        result_of(http, created)
        assert http.get(f"/v1/runs/{run_id}").json()["worker"].startswith("multi@")
        body = {"model": f"run:{run_id}", "prompt": "Once", "max_tokens": 1000, "stream": True}
        url = stack.base_url + "/openai/v1/completions"
        with httpx.Client(timeout=60) as raw, raw.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: {"))
        future_id = "fut_" + first.split('"id":"cmpl-', 1)[1].split('"', 1)[0]
        ended = wait_future(http, future_id, timeout=60)
        assert ended["status"] == "failed" and ended["error"]["code"] == "cancelled", ended
        after = result_of(http, http.post("/v1/sample", json={**PROMPT, "run_id": run_id}))
        assert len(after["sequences"][0]["tokens"]) == PROMPT["max_tokens"]
        http.delete(f"/v1/runs/{run_id}")


def test_multi_rank_worker_serves_like_one_device(stack: Service) -> None:
    with stack.http as http:
        workers = http.get("/health").json()["workers"]
        assert [w["name"].split("@")[0] for w in workers] == ["multi"]
        created = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4, "seed": 7})
        run_id = created.json()["run_id"]
        result_of(http, created)
        sharded = _train(http, run_id)
        saved = result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "s"}))
        second = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4, "seed": 8})
        run2 = second.json()["run_id"]
        result_of(http, second)
        result_of(http, http.post(f"/v1/runs/{run2}/load", json={"path": saved["path"]}))
        loaded = result_of(http, http.post(f"/v1/runs/{run2}/forward", json=DATA))
        assert _logprobs(loaded) == pytest.approx(_logprobs(sharded["after"]), abs=1e-5)

        # the same ops on a one-device worker started beside it give the same numbers
        stack.start_worker("single")
        stack.wait_workers(2)
        http.delete(f"/v1/runs/{run2}")
        created = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4, "seed": 7})
        single_run = created.json()["run_id"]
        result_of(http, created)
        assert http.get(f"/v1/runs/{single_run}").json()["worker"].startswith("single@")
        plain = _train(http, single_run)
    assert _logprobs(sharded["fb"]) == pytest.approx(_logprobs(plain["fb"]), abs=1e-5)
    assert _logprobs(sharded["after"]) == pytest.approx(_logprobs(plain["after"]), abs=1e-5)
    assert sharded["fb"]["metrics"]["loss:sum"] == pytest.approx(
        plain["fb"]["metrics"]["loss:sum"], abs=1e-4
    )
    assert [s["tokens"] for s in sharded["sample"]["sequences"]] == [
        s["tokens"] for s in plain["sample"]["sequences"]
    ]


def test_placement_refuses_a_base_no_worker_holds(stack: Service) -> None:
    with stack.http as http:
        response = http.post("/v1/runs", json={"base_model": "shaped:llama-3.1-70b", "rank": 4})
    assert response.status_code == 503, response.text
    message = response.json()["message"]
    assert "needs 131 GiB" in message and "eztinker worker --gpus" in message


def test_killing_a_rank_fails_its_futures_fast(stack: Service) -> None:
    multi = stack.processes["worker-multi"]
    with stack.http as http:
        runs = http.get("/v1/runs").json()["runs"]
        on_multi = [r["run_id"] for r in runs if r["worker"].startswith("multi@")]
        assert on_multi
        [follower] = _children(multi.pid)
        os.kill(follower, signal.SIGKILL)
        started = time.monotonic()
        op = http.post(f"/v1/runs/{on_multi[0]}/forward_backward", json=DATA).json()
        body = wait_future(http, op["future_id"], timeout=30)
        assert time.monotonic() - started < 15
        assert body["status"] == "failed"
        assert "rank 1" in body["error"]["message"] and "died" in body["error"]["message"]
        # the broken worker leaves /health; the other one keeps serving
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = [w["name"] for w in http.get("/health").json()["workers"]]
            if not any(n.startswith("multi@") for n in names):
                break
            time.sleep(0.3)
        assert not any(n.startswith("multi@") for n in names)
        single = stack.processes.get("worker-single") or stack.start_worker("single")
        stack.wait_workers(1, pids={single.pid})
        created = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4})
        run_id = created.json()["run_id"]
        result_of(http, created)
        result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json=DATA))
        # requests on the shared sampling queue no longer reach the broken worker
        base = {**PROMPT, "base_model": "tiny-llama"}
        submitted = [http.post("/v1/sample", json=base).json()["future_id"] for _ in range(4)]
        for future_id in submitted:
            assert wait_future(http, future_id, timeout=60)["status"] == "succeeded"


def test_followers_exit_when_rank_zero_dies(stack: Service) -> None:
    lead = stack.start_worker("lead", "--ranks", "2")
    deadline = time.monotonic() + 60
    followers: list[int] = []
    while time.monotonic() < deadline and not followers:
        followers = _children(lead.pid)
        time.sleep(0.2)
    [follower] = followers
    time.sleep(1.0)  # let it join the group and block in its first receive
    lead.kill()
    lead.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(follower):
        time.sleep(0.1)
    assert not _alive(follower), f"rank 1 (pid {follower}) outlived rank 0"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def test_commands_refuse_gpus_they_cannot_have(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "EZTINKER_DATA_DIR": str(tmp_path)}
    server = subprocess.run(
        [sys.executable, "-m", "eztinker", "server", "--gpus-per-worker", "2", "--no-flower"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert server.returncode == 1
    assert "need 2 GPUs; this host shows 0" in server.stderr
    worker = subprocess.run(
        [sys.executable, "-m", "eztinker", "worker", "--gpus", "0,1", "--ranks", "3"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert worker.returncode == 2
    assert "--ranks 3 contradicts --gpus 0,1" in worker.stderr
