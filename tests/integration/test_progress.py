"""A future's ``progress`` while it waits and runs, end to end (web, Redis, a real worker).

Sampling with a large ``max_tokens`` on the tiny model takes a few seconds on the CPU, long
enough to watch it: its place in the queue, then ``decode`` with the tokens generated growing.
A big ``forward_backward`` shows ``forward`` then ``backward``, and a call coalesced into its
pass shows that pass's progress too.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import redis

from tests.conftest import Service, result_of, wait_future

DONE = ("succeeded", "failed")


def new_run(http: httpx.Client) -> str:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 0})
    result_of(http, created)
    return created.json()["run_id"]


def submit(http: httpx.Client, path: str, body: dict[str, Any]) -> str:
    response = http.post(path, json=body)
    assert response.status_code == 202, response.text
    return response.json()["future_id"]


def watch(
    http: httpx.Client, future_ids: list[str], until: str, timeout: float = 180.0
) -> list[list[dict[str, Any]]]:
    """Poll the futures (batch endpoint) every 0.2 s until ``until`` is done; every body seen."""
    seen: list[list[dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bodies = http.post("/v1/futures/batch", json={"future_ids": future_ids}).json()["futures"]
        seen.append(bodies)
        if bodies[future_ids.index(until)]["status"] in DONE:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{until} not done in {timeout} s")


def test_sample_progress_queue_place_then_decode_tokens(service: Service, http: httpx.Client):
    run = new_run(http)
    long = {
        "run_id": run, "prompt": "Once upon a time", "max_tokens": 1000, "num_samples": 8,
        "stop": [], "temperature": 1.0, "seed": 0,
    }  # fmt: skip
    first = submit(http, "/v1/sample", long)
    # Behind it, two operations that must wait for it (a sample would join its decode batch):
    # forward calls of the same run.
    datum = {"model_input": {"tokens": [5, 6, 7]}, "loss_fn_inputs": {"target_tokens": [6, 7, 8]}}
    forward = f"/v1/runs/{run}/forward"
    second, third = (
        submit(http, forward, {"data": [datum]}),
        submit(http, forward, {"data": [datum]}),
    )
    single = http.get(f"/v1/futures/{third}").json()  # the one-future endpoint has it too
    assert single["status"] == "pending" and single["progress"]["phase"] == "queued"

    seen = watch(http, [first, second, third], until=first)
    running = [b[0]["progress"] for b in seen if b[0]["status"] == "running"]
    decode = [p for p in running if p["phase"] == "decode" and p["tokens_done"]]
    tokens = [p["tokens_done"] for p in decode]
    assert len(set(tokens)) >= 3, running  # watched mid-way, several times
    assert tokens == sorted(tokens), tokens  # only ever grows
    assert all(p["tokens_total"] == 1000 and p["sequences"] == 8 for p in decode)
    assert all(p["sequences_finished"] == 0 for p in decode)  # stop=[]: none stops early
    assert {p["phase"] for p in running} <= {"running", "prefill", "decode"}
    elapsed = [p["elapsed_s"] for p in running]
    assert elapsed == sorted(elapsed) and elapsed[-1] > 1.0
    assert all(p["queued_s"] >= 0 for p in running)

    # Behind it, the queued ones know their place: 0 and 1 operations ahead, 2 queued. (The
    # last look may straddle the first's end: its status read just before it finished, the
    # queue just after the worker took the next one; it is left out.)
    queued = [(b[1]["progress"], b[2]["progress"]) for b in seen if b[0]["status"] == "running"]
    places = [
        (p1["phase"], p1["ops_ahead"], p2["ops_ahead"], p2["queue_length"]) for p1, p2 in queued
    ]
    assert len(places) >= 3 and set(places[:-1]) == {("queued", 0, 1, 2)}, places
    assert all(p2["elapsed_s"] == 0 and p2["queued_s"] > 0 for _, p2 in queued)

    final = wait_future(http, first)
    assert final["status"] == "succeeded" and final["progress"] is None
    assert [len(s["tokens"]) for s in final["result"]["sequences"]] == [1000] * 8
    for future_id in (second, third):
        assert wait_future(http, future_id)["status"] == "succeeded"
    # Done: the worker deletes the progress it had published (off the op's thread, within a
    # tick of its publisher: 0.5 s).
    client = redis.Redis.from_url(service.redis_url)
    deadline = time.monotonic() + 5
    while client.exists(f"ezt:future:{first}:progress") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.exists(f"ezt:future:{first}:progress") == 0


def test_forward_backward_progress_phases_and_coalesced_calls(http: httpx.Client) -> None:
    run = new_run(http)
    # A sample in front holds the run's queue, so that the two calls behind it are queued
    # together and coalesced into one pass when their turn comes.
    blocker = {"run_id": run, "prompt": "x", "max_tokens": 300, "stop": [], "num_samples": 2}
    submit(http, "/v1/sample", blocker)
    datum = {"model_input": {"tokens": [5] * 256}, "loss_fn_inputs": {"target_tokens": [6] * 256}}
    # Big enough that each phase outlasts the 0.5 s between progress reports on a busy CPU.
    body = {"data": [datum] * 32, "loss_fn": "cross_entropy"}  # 2 x 8,192: one pass
    a = submit(http, f"/v1/runs/{run}/forward_backward", body)
    b = submit(http, f"/v1/runs/{run}/forward_backward", body)

    seen = watch(http, [a, b], until=a)
    phases_a = [x[0]["progress"]["phase"] for x in seen if x[0]["status"] == "running"]
    loss_phases = [p for p in phases_a if p in ("forward", "backward")]
    assert "forward" in loss_phases and "backward" in loss_phases, phases_a
    assert loss_phases == sorted(loss_phases, key=("forward", "backward").index), phases_a
    passes = [x[0]["progress"] for x in seen if x[0]["progress"]]
    in_pass = [p for p in passes if p["phase"] in ("forward", "backward")]
    assert all((p["tokens_total"], p["sequences"]) == (2 * 32 * 256, 64) for p in in_pass)

    # B ran inside A's pass: it showed that pass's progress (running) before its own turn.
    with_a = [x[1] for x in seen if x[0]["status"] == "running" and x[0]["progress"]]
    coalesced = [x for x in with_a if x["progress"]["phase"] in ("forward", "backward")]
    assert coalesced and all(x["status"] == "running" for x in coalesced), with_a
    assert wait_future(http, a)["status"] == "succeeded"
    assert wait_future(http, b)["status"] == "succeeded"
