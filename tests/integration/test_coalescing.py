"""Queued forward_backward calls of a run share one pass, with the answers of one by one."""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from config import Settings
from eztinker_tasks import names
from eztinker_tasks.celery_app import make_celery
from eztinker_tasks.errors import OperationFailed
from tests.conftest import Service, result_of, wait_future

SEQS = [[5 + i, 17, 42 + i, 99, 7, 300 - i, 12, 64 + 2 * i][: 4 + i % 4] for i in range(6)]


def _fb(seq: list[int], seq_id: int) -> dict:
    return {"input_ids": seq, "target_ids": seq, "seq_id": seq_id}


def _create(http: httpx.Client) -> str:
    created = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4, "seed": 5})
    result_of(http, created)
    return created.json()["run_id"]


def test_queued_calls_coalesce_and_match_sequential(service: Service, http: httpx.Client) -> None:
    queued, sequential = _create(http), _create(http)
    # Keep the worker busy so the calls below pile up in the run's queue.
    busy = http.post(
        "/v1/sample",
        json={"run_id": queued, "prompt_tokens": [1, 2, 3], "max_tokens": 300, "stop": []},
    )
    futures = [
        http.post(f"/v1/runs/{queued}/forward_backward", json=_fb(s, i + 1)).json()
        for i, s in enumerate(SEQS)
    ]
    step = http.post(
        f"/v1/runs/{queued}/optim_step", json={"learning_rate": 1e-2, "seq_id": len(SEQS) + 1}
    )
    assert wait_future(http, busy.json()["future_id"])["status"] == "succeeded"
    got = [wait_future(http, f["future_id"]) for f in futures]
    assert all(g["status"] == "succeeded" for g in got), got
    result_of(http, step)

    # The calls behind the first one were answered by its pass: they never started alone.
    r = redis.Redis.from_url(service.redis_url)
    started = [json.loads(r.get(f"ezt:future:{f['future_id']}:started") or "{}") for f in futures]
    assert "pass" not in started[0]
    assert all(m["pass"] == futures[0]["future_id"] for m in started[1:]), started
    assert all(g["result"]["batch"]["calls"] == len(SEQS) for g in got)

    expected = []
    for s in SEQS:
        expected.append(
            result_of(
                http,
                http.post(
                    f"/v1/runs/{sequential}/forward_backward",
                    json={"input_ids": s, "target_ids": s},
                ),
            )
        )
    result_of(http, http.post(f"/v1/runs/{sequential}/optim_step", json={"learning_rate": 1e-2}))
    for g, e in zip(got, expected, strict=True):
        assert g["result"]["metrics"]["loss:sum"] == pytest.approx(
            e["metrics"]["loss:sum"], rel=1e-5
        )
        assert g["result"]["loss_fn_outputs"][0]["logprobs"] == pytest.approx(
            e["loss_fn_outputs"][0]["logprobs"], abs=1e-5
        )
    a, b = http.get(f"/v1/runs/{queued}").json(), http.get(f"/v1/runs/{sequential}").json()
    assert (
        (a["step"], a["tokens_trained"])
        == (b["step"], b["tokens_trained"])
        == (1, sum(len(s) - 1 for s in SEQS))
    )
    probe = {"tokens": SEQS[0]}
    lp_a = result_of(http, http.post("/v1/compute_logprobs", json={**probe, "run_id": queued}))
    lp_b = result_of(http, http.post("/v1/compute_logprobs", json={**probe, "run_id": sequential}))
    assert lp_a["logprobs"][1:] == pytest.approx(lp_b["logprobs"][1:], abs=1e-4)

    # A coalesced call is still idempotent: resubmitting it returns the same, finished future.
    again = http.post(f"/v1/runs/{queued}/forward_backward", json=_fb(SEQS[2], 3)).json()
    assert again["future_id"] == futures[2]["future_id"]
    assert wait_future(http, again["future_id"])["result"] == got[2]["result"]
    # Nothing was left behind in the run's queue.
    assert r.llen(f"run.{queued}") == 0


def test_a_bad_call_in_the_queue_fails_alone(service: Service, http: httpx.Client) -> None:
    run_id = _create(http)
    busy = http.post(
        "/v1/sample",
        json={"run_id": run_id, "prompt_tokens": [1, 2, 3], "max_tokens": 300, "stop": []},
    )
    good = http.post(f"/v1/runs/{run_id}/forward_backward", json=_fb(SEQS[0], 1)).json()
    # A message the API would have refused (token id outside the vocabulary), sent straight to
    # the run's queue behind the good call: the engine must reject it without harm.
    app = make_celery(Settings.from_env({}), service.redis_url)
    bad = app.send_task(
        names.FORWARD_BACKWARD,
        kwargs={
            "run_id": run_id,
            "seq_id": 2,
            "loss_fn": "cross_entropy",
            "data": [{"tokens": [1, 2, 99999], "loss_fn_inputs": {"target_tokens": [2, 3, 4]}}],
        },
        queue=names.run_queue(run_id),
    )
    after = http.post(f"/v1/runs/{run_id}/forward_backward", json=_fb(SEQS[1], 3)).json()
    wait_future(http, busy.json()["future_id"])
    assert wait_future(http, good["future_id"])["status"] == "succeeded"
    assert wait_future(http, after["future_id"])["status"] == "succeeded"
    with pytest.raises(OperationFailed, match="99999"):
        bad.get(timeout=60)
    info = http.get(f"/v1/runs/{run_id}").json()
    assert info["tokens_trained"] == len(SEQS[0]) - 1 + len(SEQS[1]) - 1
