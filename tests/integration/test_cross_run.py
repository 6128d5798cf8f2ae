"""Through the service: the queued calls of many runs on one worker share one pass (issue 11).

Eight runs, driven by eight SDK clients in parallel threads, pipeline forward_backward +
optim_step while the worker is busy, so their calls pile up and run together. Every future's
result equals what the same call gives to a twin run trained alone, most results say they
shared a pass (``batch.runs`` > 1), and no run's training moves another's weights.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import redis

import eztinker
from eztinker import types
from tests.conftest import Service, result_of

RUNS = 8
STEPS = 2


def _datum(i: int, step: int) -> types.Datum:
    tokens = [5 + i, 17 + step, 42, 99 - i, 7, 300 + 3 * i, 12][: 5 + i % 3]
    return types.Datum(
        types.ModelInput.from_ints(tokens[:-1]),
        {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


ADAM = types.AdamParams(learning_rate=2e-2)


def _loop(tc: eztinker.TrainingClient, i: int, out: list, steps: list) -> None:
    futures = []
    for step in range(STEPS):
        futures.append(tc.forward_backward([_datum(i, step)], "cross_entropy"))
        steps.append(tc.optim_step(ADAM))
    out[i] = [f.result() for f in futures]


@pytest.mark.timeout(900)
def test_eight_clients_share_passes_and_get_their_solo_results(
    service: Service, http: httpx.Client
) -> None:
    sdk = eztinker.ServiceClient(base_url=service.base_url)
    shared = [
        sdk.create_lora_training_client("tiny-llama", rank=4, seed=20 + i) for i in range(RUNS)
    ]
    solo = [sdk.create_lora_training_client("tiny-llama", rank=4, seed=20 + i) for i in range(RUNS)]
    # A long sample of one run keeps the worker busy, so the others' calls pile up behind it.
    busy = http.post(
        "/v1/sample",
        json={
            "run_id": shared[0].run_id,
            "prompt_tokens": [1, 2, 3],
            "max_tokens": 400,
            "stop": [],
        },
    )
    results: list = [None] * RUNS
    steps: list = []
    threads = [
        threading.Thread(target=_loop, args=(shared[i], i, results, steps)) for i in range(RUNS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    result_of(http, busy)
    for f in steps:
        f.result()
    # Optim steps of other runs waiting at the heads of their queues ran with a starting one.
    r = redis.Redis.from_url(service.redis_url)
    markers = [json.loads(r.get(f"ezt:future:{f.future_id}:started") or "{}") for f in steps]
    assert sum("pass" in m for m in markers) >= RUNS // 2, markers

    shared_passes = 0
    for i in range(RUNS):  # the twins, one call at a time: nothing to share
        for step in range(STEPS):
            want = solo[i].forward_backward([_datum(i, step)], "cross_entropy").result()
            solo[i].optim_step(ADAM).result()
            got = results[i][step]
            assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], abs=1e-5)
            for g, w in zip(got.loss_fn_outputs, want.loss_fn_outputs, strict=True):
                assert g["logprobs"].tolist() == pytest.approx(w["logprobs"].tolist(), abs=1e-5)
            shared_passes += (got.batch or {}).get("runs", 1) > 1
    assert shared_passes >= RUNS * STEPS // 2, shared_passes
    # Same weights after training: a forward of each run equals its twin's (fp32: the two
    # trained with sums in another order over several AdamW steps, so within 5e-6 relative).
    probe = [_datum(99, 0)]
    for a, b in zip(shared, solo, strict=True):
        la = a.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
        lb = b.forward(probe, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()
        assert la == pytest.approx(lb, rel=5e-6, abs=1e-5)


def test_results_show_their_pass_and_timing_in_sdk_and_cli(
    service: Service, http: httpx.Client
) -> None:
    from typer.testing import CliRunner

    from eztinker.cli import app

    sdk = eztinker.ServiceClient(base_url=service.base_url)
    tc = sdk.create_lora_training_client("tiny-gpt2", rank=4, seed=1)
    future = tc.forward_backward([_datum(1, 0)], "cross_entropy")
    out = future.result()
    assert out.batch is not None and out.batch["runs"] >= 1 and out.batch["tokens"] > 0
    assert out.timing is not None and out.timing["queued_ms"] >= 0 and out.timing["run_ms"] > 0
    step = tc.optim_step(ADAM).result()
    assert step.timing is not None and step.timing["run_ms"] > 0
    body = http.get(f"/v1/futures/{future.future_id}").json()
    assert body["timing"] == out.timing
    shown = CliRunner().invoke(app, ["--base-url", service.base_url, "wait", future.future_id])
    assert shown.exit_code == 0, shown.output
    assert "queued" in shown.stdout and "ran" in shown.stdout
    assert "pass: 1 run(s), 1 call(s)" in shown.stdout


def test_a_call_answered_in_another_calls_pass_says_which(
    service: Service, http: httpx.Client
) -> None:
    sdk = eztinker.ServiceClient(base_url=service.base_url)
    runs = [sdk.create_lora_training_client("tiny-gpt2", rank=4, seed=30 + i) for i in range(3)]
    busy = http.post(
        "/v1/sample",
        json={"run_id": runs[0].run_id, "prompt_tokens": [1, 2], "max_tokens": 200, "stop": []},
    )
    futures = [tc.forward_backward([_datum(i, 0)], "cross_entropy") for i, tc in enumerate(runs)]
    result_of(http, busy)
    for f in futures:
        f.result()
    shared = [f.timing for f in futures if f.timing and f.timing.get("in_pass_of")]
    assert shared, [f.timing for f in futures]
    lead = {t["in_pass_of"] for t in shared}
    assert lead <= {f.future_id for f in futures}
