"""Many request threads at once: every request is judged on its own body.

The web answers with many threads per process (gunicorn gthread) and every schema, cache and
client object in it is shared by those threads. Per-request state kept on a shared object lets
one request's body decide another's outcome; these tests fire mixed, valid and invalid, bodies
from many client threads at once and check each answer against what its own body deserves.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.conftest import Service, wait_future

TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
ROUNDS = 50  # each round sends every case once; 50 rounds are ~800 requests
THREADS = 48


def _datum(tokens: list[int]) -> dict[str, Any]:
    targets = [*tokens[1:], 1]
    return {
        "model_input": {"tokens": tokens},
        "loss_fn_inputs": {"target_tokens": targets, "weights": [1.0] * len(targets)},
    }


def _cases(run_id: str) -> list[tuple[str, str, dict[str, Any], int]]:
    """(name, path, body, expected status): shapes that a per-request mix-up would confuse."""
    run = f"/v1/runs/{run_id}"
    return [
        ("optim nested", f"{run}/optim_step", {"adam_params": {"learning_rate": 1e-4}}, 202),
        ("optim flat", f"{run}/optim_step", {"learning_rate": 1e-4, "weight_decay": 0.0}, 202),
        ("optim empty", f"{run}/optim_step", {}, 202),
        (
            "optim both",
            f"{run}/optim_step",
            {"adam_params": {"learning_rate": 1e-4}, "learning_rate": 1e-4},
            422,
        ),
        ("forward datums", f"{run}/forward", {"data": [_datum(TOKENS)]}, 202),
        ("forward seed", f"{run}/forward", {"input_ids": TOKENS, "target_ids": TOKENS}, 202),
        (
            "forward both",
            f"{run}/forward",
            {"data": [_datum(TOKENS)], "input_ids": TOKENS},
            422,
        ),
        ("forward chunks", f"{run}/forward", {"data": [_chunked(TOKENS)]}, 202),
        ("sample text", "/v1/sample", {"prompt": "Once", "max_tokens": 1}, 202),
        ("sample tokens", "/v1/sample", {"prompt_tokens": [5, 17], "max_tokens": 1}, 202),
        (
            "sample both prompts",
            "/v1/sample",
            {"prompt": "Once", "prompt_tokens": [5], "max_tokens": 1},
            422,
        ),
        ("sample run", "/v1/sample", {"run_id": run_id, "prompt": "a", "max_tokens": 1}, 202),
        (
            "sample two sources",
            "/v1/sample",
            {"run_id": run_id, "base_model": "tiny-gpt2", "prompt": "a", "max_tokens": 1},
            422,
        ),
        ("logprobs run", "/v1/compute_logprobs", {"run_id": run_id, "tokens": TOKENS}, 202),
        ("logprobs base", "/v1/compute_logprobs", {"tokens": TOKENS}, 202),
        ("tokenize", "/v1/tokenize", {"text": "hello there"}, 200),
    ]


def _chunked(tokens: list[int]) -> dict[str, Any]:
    datum = _datum(tokens)
    half = len(tokens) // 2
    datum["model_input"] = {
        "chunks": [{"tokens": tokens[:half]}, {"type": "encoded_text", "tokens": tokens[half:]}]
    }
    return datum


def test_concurrent_requests_are_each_judged_on_their_own_body(
    service: Service, run_id: str
) -> None:
    cases = _cases(run_id)
    jobs = [case for _ in range(ROUNDS) for case in cases]
    # A connection per request: gunicorn closes idle keep-alive connections after 2 s, and a
    # request sent on one just as it closes fails without an answer, whatever its body.
    limits = httpx.Limits(max_connections=THREADS, max_keepalive_connections=0)
    with httpx.Client(base_url=service.base_url, timeout=60, limits=limits) as client:

        def send(case: tuple[str, str, dict[str, Any], int]) -> tuple[str, int, int, str]:
            name, path, body, expected = case
            r = client.post(path, json=body)
            return name, expected, r.status_code, r.text

        with ThreadPoolExecutor(THREADS) as pool:
            answers = list(pool.map(send, jobs))
        wrong = [a for a in answers if a[1] != a[2]]
        assert not wrong, f"{len(wrong)} of {len(answers)} misjudged, e.g. {wrong[:3]}"
        # The run took every accepted operation, in order: its last one succeeds.
        last = client.post(f"/v1/runs/{run_id}/forward", json={"data": [_datum(TOKENS)]})
        assert wait_future(client, last.json()["future_id"], timeout=300)["status"] == "succeeded"
        accepted = sum(1 for name, _, status, _ in answers if status == 202 and "optim" in name)
        assert accepted == 3 * ROUNDS
        assert client.get(f"/v1/runs/{run_id}").json()["step"] == accepted


def test_many_run_creations_at_once_all_answer(service: Service) -> None:
    # Binding a run's queue is a Celery broadcast; on the app's pooled connections (10) ten
    # at once each held one and waited forever for a second: the web process hung.
    creations = 24
    limits = httpx.Limits(max_connections=creations, max_keepalive_connections=0)
    with httpx.Client(base_url=service.base_url, timeout=30, limits=limits) as client:

        def create(_: int) -> httpx.Response:
            return client.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4})

        with ThreadPoolExecutor(creations) as pool:
            created = list(pool.map(create, range(creations)))
        assert [r.status_code for r in created] == [201] * creations, created[0].text
        for r in created:
            assert wait_future(client, r.json()["future_id"])["status"] == "succeeded"
        deleted = [client.delete(f"/v1/runs/{r.json()['run_id']}") for r in created]
        for r in deleted:
            assert wait_future(client, r.json()["future_id"])["status"] == "succeeded"
        assert client.get("/health").json()["status"] == "ok"
