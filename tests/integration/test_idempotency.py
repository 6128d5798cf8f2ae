"""seq_id makes submits and redeliveries safe: nothing is applied twice."""

from __future__ import annotations

import json

import httpx

from config import Settings
from eztinker_tasks import names
from eztinker_tasks.celery_app import make_celery
from tests.conftest import Service, result_of, wait_future

TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
FB = {"input_ids": TOKENS, "target_ids": TOKENS}


def _create(http: httpx.Client) -> str:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 0})
    result_of(http, created)
    return created.json()["run_id"]


def test_resubmitted_seq_id_returns_the_original_future(http: httpx.Client) -> None:
    run_id = _create(http)
    first = http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 1})
    again = http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 1})
    assert first.status_code == again.status_code == 202
    assert first.json()["future_id"] == again.json()["future_id"]
    other = http.post(
        f"/v1/runs/{run_id}/forward_backward",
        json={"input_ids": TOKENS[:4], "target_ids": TOKENS[:4], "seq_id": 1},
    )
    assert other.status_code == 409
    assert other.json()["code"] == "conflict"
    result_of(http, first)
    step = http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-3, "seq_id": 2})
    step_again = http.post(
        f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-3, "seq_id": 2}
    )
    assert step.json()["future_id"] == step_again.json()["future_id"]
    result_of(http, step_again)
    info = http.get(f"/v1/runs/{run_id}").json()
    assert info["step"] == 1
    assert info["tokens_trained"] == len(TOKENS) - 1
    # Server-assigned seq_ids continue after client-given ones.
    nxt = http.post(f"/v1/runs/{run_id}/forward_backward", json=FB).json()
    assert nxt["seq_id"] == 3


def test_redelivered_message_is_not_applied_twice(service: Service, http: httpx.Client) -> None:
    run_id = _create(http)
    result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json=FB))
    step = http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2})
    original = result_of(http, step)
    assert original["metrics"]["step"] == 1

    # Redeliver the very same message (same task id, same seq_id), as the broker does after
    # a lost acknowledgement.
    app = make_celery(Settings.from_env({}), service.redis_url)
    app.send_task(
        names.OPTIM_STEP,
        kwargs={
            "run_id": run_id,
            "seq_id": step.json()["seq_id"],
            "adam": {"learning_rate": 1e-2},
        },
        task_id=step.json()["future_id"],
        queue=names.run_queue(run_id),
    )
    again = wait_future(http, step.json()["future_id"])
    assert again["status"] == "succeeded"
    assert again["result"] == original
    info = http.get(f"/v1/runs/{run_id}").json()
    assert info["step"] == 1  # not applied twice

    # A copy under a new task id but the same seq_id answers with the original result.
    copy = app.send_task(
        names.OPTIM_STEP,
        kwargs={"run_id": run_id, "seq_id": step.json()["seq_id"], "adam": {"learning_rate": 1}},
        queue=names.run_queue(run_id),
    )
    assert copy.get(timeout=60) == original
    assert http.get(f"/v1/runs/{run_id}").json()["step"] == 1
    # ...and the run keeps going normally.
    nxt = result_of(http, http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 0}))
    assert nxt["metrics"]["step"] == 2


def test_a_new_seq_id_below_the_latest_is_refused(http: httpx.Client) -> None:
    run_id = _create(http)
    ahead = http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 10})
    assert ahead.status_code == 202
    behind = http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 5})
    assert behind.status_code == 409
    body = behind.json()
    assert body["code"] == "conflict"
    assert "seq_id 5 is not after seq_id 10" in body["message"]
    assert body["errors"] == {"seq_id": ["must be greater than 10"]}
    # Nothing was queued for it; the run goes on, numbering after 10.
    result_of(http, ahead)
    nxt = http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-3})
    assert nxt.json()["seq_id"] == 11
    assert result_of(http, nxt)["metrics"]["step"] == 1
    # Big numbers stay exact (up to the 10**12 cap); above it the body is invalid.
    big = http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 10**12})
    assert big.status_code == 202 and big.json()["seq_id"] == 10**12
    below = http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 10**12 - 1})
    assert below.status_code == 409
    assert below.json()["errors"] == {"seq_id": [f"must be greater than {10**12}"]}
    over = http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 10**12 + 1})
    assert over.status_code == 422 and "seq_id" in over.json()["errors"]
    result_of(http, big)


def test_a_late_redelivery_is_refused_not_applied_out_of_order(
    service: Service, http: httpx.Client
) -> None:
    run_id = _create(http)
    result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json={**FB, "seq_id": 5}))
    step = http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2, "seq_id": 6})
    assert result_of(http, step)["metrics"]["step"] == 1

    # The message of an optim_step with seq_id 3 comes back now, as one does when its worker
    # died while running it and the broker restores it after the visibility timeout.
    app = make_celery(Settings.from_env({}), service.redis_url)
    late = app.send_task(
        names.OPTIM_STEP,
        kwargs={"run_id": run_id, "seq_id": 3, "adam": {"learning_rate": 1.0}},
        queue=names.run_queue(run_id),
    )
    late.get(timeout=60, propagate=False)
    assert late.failed()
    envelope = json.loads(late.result.args[0])
    assert envelope["code"] == "stale_operation"
    assert envelope["category"] == "user"
    assert "arrived after operation 6 was applied" in envelope["message"]
    assert http.get(f"/v1/runs/{run_id}").json()["step"] == 1  # not applied
    nxt = result_of(http, http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 0}))
    assert nxt["metrics"]["step"] == 2
