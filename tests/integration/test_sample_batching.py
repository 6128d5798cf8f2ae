"""Sample requests waiting in a queue run in ONE decode batch with the one that starts (web,
Redis, a real worker): each gets exactly what it gets alone, under its own future; a bad one
fails alone; a run's samples never overtake its training ops."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Service, result_of, start_service, wait_future


def submit(http: httpx.Client, path: str, body: dict[str, Any]) -> str:
    response = http.post(path, json=body)
    assert response.status_code == 202, response.text
    return response.json()["future_id"]


def wait_running(http: httpx.Client, future_id: str) -> None:
    deadline = time.monotonic() + 60
    while http.get(f"/v1/futures/{future_id}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the blocker never ran"
        time.sleep(0.05)


def blocker(http: httpx.Client, body: dict[str, Any]) -> str:
    """A long sample running on the worker (samples submitted now join its batch)."""
    long = {**body, "max_tokens": 1000, "num_samples": 8, "stop": [], "temperature": 1.0}
    future = submit(http, "/v1/sample", long)
    wait_running(http, future)
    return future


def training_blocker(http: httpx.Client) -> str:
    """A big forward_backward of a run of its own: it holds the (only) worker, so samples
    submitted now wait in their queue, and the first to start takes the others with it."""
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 9})
    run = result_of(http, created)["run_id"]
    datum = {"model_input": {"tokens": [5] * 512}, "loss_fn_inputs": {"target_tokens": [6] * 512}}
    future = submit(http, f"/v1/runs/{run}/forward_backward", {"data": [datum] * 24})
    wait_running(http, future)
    return future


def sequences(body: dict[str, Any]) -> list[tuple[list[int], list[float]]]:
    return [(s["tokens"], s["logprobs"]) for s in body["result"]["sequences"]]


def same(got: dict[str, Any], alone: dict[str, Any]) -> bool:
    """Same tokens, logprobs within 1e-5 (fp32 on the CPU)."""
    pairs = list(zip(sequences(got), sequences(alone), strict=True))
    return all(
        tokens == tokens_alone
        and max((abs(a - b) for a, b in zip(lps, lps_alone, strict=True)), default=0) <= 1e-5
        for (tokens, lps), (tokens_alone, lps_alone) in pairs
    )


def assert_same(got: dict[str, Any], alone: dict[str, Any]) -> None:
    assert got["status"] == alone["status"] == "succeeded", (got, alone)
    assert same(got, alone), (sequences(got), sequences(alone))


def test_waiting_samples_of_bases_and_checkpoints_decode_in_one_batch(
    service: Service, http: httpx.Client
) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 3})
    run = result_of(http, created)["run_id"]
    datum = {
        "model_input": {"tokens": [5, 6, 7, 8]},
        "loss_fn_inputs": {"target_tokens": [6, 7, 8, 9]},
    }
    for _ in range(3):
        submit(http, f"/v1/runs/{run}/forward_backward", {"data": [datum]})
        submit(http, f"/v1/runs/{run}/optim_step", {"learning_rate": 1e-2})
    saved = submit(http, f"/v1/runs/{run}/save", {"name": "s", "kind": "sampler"})
    checkpoint = wait_future(http, saved)["result"]["path"]

    requests = [
        {"base_model": "tiny-gpt2", "prompt_tokens": [5, 17, 42], "max_tokens": 12,
         "num_samples": 3, "temperature": 1.2, "seed": 1, "stop": []},
        {"checkpoint": checkpoint, "prompt": "Once upon", "max_tokens": 9, "seed": 2,
         "prompt_logprobs": True},
        {"checkpoint": checkpoint, "prompt_tokens": [11], "max_tokens": 15, "num_samples": 2,
         "top_k": 4, "seed": 3, "stop": ["e"]},
        {"base_model": "tiny-gpt2", "prompt_tokens": [2, 2048 * 1024], "max_tokens": 4},
        # Another base: it does not join (nor does anything queued behind it).
        {"base_model": "tiny-llama", "prompt_tokens": [9, 8, 7, 6], "max_tokens": 7,
         "temperature": 0.0, "stop": []},
    ]  # fmt: skip
    block = training_blocker(http)
    futures = []
    for body in requests:
        response = http.post("/v1/sample", json=body)
        if response.status_code != 202:  # the web may refuse the bad one at submit
            assert response.status_code in (400, 422), response.text
            futures.append(None)
            continue
        futures.append(response.json()["future_id"])
    assert http.get(f"/v1/futures/{block}").json()["status"] == "running", "too short a block"
    assert wait_future(http, block)["status"] == "succeeded"
    together = [None if f is None else wait_future(http, f) for f in futures]

    bad = together[3]
    if bad is not None:  # refused by the worker: its own user error, nothing else failed
        assert bad["status"] == "failed" and bad["error"]["category"] == "user", bad
    good = [i for i in range(len(requests)) if i != 3]
    answers: dict[int, dict[str, Any]] = {}
    for i in good:
        answer = together[i]
        assert answer is not None
        answers[i] = answer
    # The first waiting request led the batch; the others on its base ran in its pass.
    lead = futures[0]
    for i in good[1:]:
        timing = answers[i]["timing"]
        assert timing is not None, i
        if requests[i].get("base_model") == "tiny-llama":
            assert timing.get("in_pass_of") != lead, (i, timing)
        else:
            assert timing.get("in_pass_of") == lead, (i, timing)

    # Each alone (one at a time) gives exactly the same.
    for i in good:
        alone = wait_future(http, submit(http, "/v1/sample", requests[i]))
        assert_same(answers[i], alone)
        if requests[i].get("prompt_logprobs"):
            got, want = answers[i]["result"]["prompt_logprobs"], alone["result"]["prompt_logprobs"]
            assert got[0] is None and want[0] is None
            assert got[1:] == pytest.approx(want[1:], abs=1e-5)


def test_a_runs_samples_batch_only_up_to_its_next_training_op(
    service: Service, http: httpx.Client
) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 5})
    run = result_of(http, created)["run_id"]
    greedy = {"run_id": run, "prompt_tokens": [5, 6], "max_tokens": 6, "temperature": 0.0}
    before = wait_future(http, submit(http, "/v1/sample", greedy))
    block = blocker(http, {"run_id": run, "prompt_tokens": [1]})
    first = [submit(http, "/v1/sample", {**greedy, "seed": s}) for s in range(3)]
    datum = {"model_input": {"tokens": [5, 6, 7]}, "loss_fn_inputs": {"target_tokens": [6, 7, 8]}}
    fb = submit(http, f"/v1/runs/{run}/forward_backward", {"data": [datum] * 4})
    step = submit(http, f"/v1/runs/{run}/optim_step", {"learning_rate": 0.5})
    after = submit(http, "/v1/sample", greedy)
    assert wait_future(http, block)["status"] == "succeeded"

    batch = [wait_future(http, f) for f in first]
    # They joined the run's sample that was decoding; the samples after the step did not.
    assert [b["timing"].get("in_pass_of") for b in batch] == [block] * 3
    for body in batch:  # the weights before the step
        assert_same(body, before)
    assert wait_future(http, fb)["status"] == "succeeded"
    assert wait_future(http, step)["status"] == "succeeded"
    late = wait_future(http, after)
    assert late["timing"].get("in_pass_of") in (None, after)  # not in the earlier batch
    assert not same(late, before)  # it saw the step (lr 0.5 moves greedy)


def test_a_short_sample_joins_a_long_decode_and_returns_long_before_it(
    service: Service, http: httpx.Client
) -> None:
    short = {"base_model": "tiny-gpt2", "prompt_tokens": [5, 6], "max_tokens": 16, "seed": 4}
    alone = wait_future(http, submit(http, "/v1/sample", short))
    block = blocker(http, {"base_model": "tiny-gpt2", "prompt_tokens": [1]})
    started = time.monotonic()
    joined = wait_future(http, submit(http, "/v1/sample", short))
    took = time.monotonic() - started
    # Answered while the long one still decodes, in its batch.
    assert http.get(f"/v1/futures/{block}").json()["status"] == "running", took
    assert joined["timing"]["in_pass_of"] == block
    assert_same(joined, alone)
    long = wait_future(http, block)
    assert long["status"] == "succeeded"
    assert [len(s["tokens"]) for s in long["result"]["sequences"]] == [1000] * 8


def test_samples_in_a_batch_whose_worker_dies_fail_promptly_none_hang(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> None:
    svc = start_service(tmp_path_factory.mktemp("dying"), model_cache, workers=1)
    try:
        with svc.http as http:
            long = {"base_model": "tiny-gpt2", "prompt_tokens": [1], "max_tokens": 1000,
                    "num_samples": 8, "stop": []}  # fmt: skip
            lead = blocker(http, long)
            joined = [submit(http, "/v1/sample", {**long, "seed": s}) for s in range(2)]
            deadline = time.monotonic() + 30
            while not all(http.get(f"/v1/futures/{f}").json()["status"] == "running"
                          for f in joined):  # fmt: skip
                assert time.monotonic() < deadline, "they never joined"
                time.sleep(0.05)
            (worker,) = svc.wait_workers(1)
            os.kill(worker["pid"], signal.SIGKILL)
            killed = time.monotonic()
            bodies = [wait_future(http, f, timeout=60) for f in [lead, *joined]]
            assert time.monotonic() - killed < 30
            for body in bodies:
                assert body["status"] == "failed", body
                assert body["error"]["code"] == "worker_gone", body
    finally:
        svc.stop()


def test_the_lead_is_answered_when_it_ends_not_when_its_batch_does(
    service: Service, http: httpx.Client
) -> None:
    block = training_blocker(http)
    short_body = {"base_model": "tiny-gpt2", "prompt_tokens": [3], "max_tokens": 4, "stop": []}
    long_body = {"base_model": "tiny-gpt2", "prompt_tokens": [1], "max_tokens": 1000,
                 "num_samples": 8, "stop": []}  # fmt: skip
    short = submit(http, "/v1/sample", short_body)
    long = submit(http, "/v1/sample", long_body)
    assert wait_future(http, block)["status"] == "succeeded"
    first = wait_future(http, short)
    assert first["status"] == "succeeded"
    # The long one joined the short one's batch and still decodes: the short one (its lead)
    # did not wait for it, and its timing is its own.
    assert http.get(f"/v1/futures/{long}").json()["status"] == "running"
    later = wait_future(http, long)
    assert later["timing"]["in_pass_of"] == short
    assert first["timing"]["run_ms"] < later["timing"]["run_ms"]
