"""Through the real service: no NaN reaches a run, and every accepted number computes (issue 10).

A1: masked positions never enter the loss arithmetic; a pass that still overflows fails with a
``user`` error naming datum and position and the run is untouched; absurd inputs are 4xx at
submit. A3: every sampling value the API accepts samples correctly (a temperature too small to
divide by behaves as greedy; the nucleus always keeps the most likely token) or is refused at
submit; a user error never comes back as ``server``.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from tests.conftest import Service, result_of, wait_future

TOKENS, TARGETS = [5, 17, 42], [17, 42, 99]


def _rl_datum(**inputs: list[float]) -> dict[str, Any]:
    loss_inputs = {
        "target_tokens": TARGETS,
        "logprobs": [-100.0, -7.0, -7.0],
        "advantages": [0.0, 1.0, 1.0],
        "weights": [0, 1, 1],
        **inputs,
    }
    return {"model_input": {"tokens": TOKENS}, "loss_fn_inputs": loss_inputs}


def _fb(http: httpx.Client, run: str, data: list[dict[str, Any]], loss_fn: str) -> httpx.Response:
    return http.post(f"/v1/runs/{run}/forward_backward", json={"data": data, "loss_fn": loss_fn})


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo"])
def test_placeholder_logprob_at_a_masked_prompt_trains_and_the_run_keeps_sampling(
    http: httpx.Client, service: Service, loss_fn: str
) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 8})
    run = created.json()["run_id"]
    result_of(http, created)
    out = result_of(http, _fb(http, run, [_rl_datum()], loss_fn))
    assert math.isfinite(out["metrics"]["loss:sum"])
    assert out["loss_fn_outputs"][0]["elementwise_loss"][0] == 0.0
    step = result_of(http, http.post(f"/v1/runs/{run}/optim_step", json={"learning_rate": 1e-2}))
    assert math.isfinite(step["metrics"]["grad_norm"])
    sampled = http.post(
        "/v1/sample", json={"run_id": run, "prompt_tokens": [5, 17], "num_samples": 2}
    )
    assert len(result_of(http, sampled)["sequences"]) == 2


def test_an_overflowing_pass_is_a_user_error_and_changes_nothing(
    http: httpx.Client, run_id: str
) -> None:
    before = http.get(f"/v1/runs/{run_id}").json()
    bad = _fb(
        http,
        run_id,
        [_rl_datum(), _rl_datum(logprobs=[-100.0, -1e30, -7.0])],
        "importance_sampling",
    )
    body = wait_future(http, bad.json()["future_id"])
    assert body["status"] == "failed", body
    assert body["error"]["category"] == "user"
    assert body["error"]["code"] == "non_finite"
    assert "data[1] position 1" in body["error"]["message"]
    # Nothing was applied: the next step finds no gradient from the refused call, and the run
    # trains on as before.
    step = result_of(http, http.post(f"/v1/runs/{run_id}/optim_step", json={}))
    assert step["metrics"]["grad_norm"] == 0.0
    after = http.get(f"/v1/runs/{run_id}").json()
    assert after["tokens_trained"] == before["tokens_trained"]


RAW_BAD_INPUTS = [
    ('"logprobs": [-100.0, NaN, -7.0]', "nan"),
    ('"logprobs": [-100.0, -Infinity, -7.0]', "inf"),
    ('"advantages": [0.0, Infinity, 1.0]', "inf"),
    ('"weights": [0, 1, NaN]', "nan"),
    ('"weights": [0, 1e39, 1]', "float32"),
    ('"advantages": [0, -1e39, 1]', "float32"),
    ('"logprobs": [-100.0, 5.0, -7.0]', "above 0"),
]


@pytest.mark.parametrize(("field", "needle"), RAW_BAD_INPUTS)
def test_non_finite_or_absurd_loss_inputs_are_4xx_at_submit(
    http: httpx.Client, run_id: str, field: str, needle: str
) -> None:
    key = field.split(":")[0].strip('"')
    defaults = {
        "logprobs": "[-100.0, -7.0, -7.0]",
        "advantages": "[0.0, 1.0, 1.0]",
        "weights": "[0, 1, 1]",
    }
    defaults.pop(key)
    rest = ", ".join(f'"{k}": {v}' for k, v in defaults.items())
    raw = (
        '{"loss_fn": "ppo", "data": [{"model_input": {"tokens": [5, 17, 42]}, '
        f'"loss_fn_inputs": {{"target_tokens": [17, 42, 99], {field}, {rest}}}}}]}}'
    )
    r = http.post(
        f"/v1/runs/{run_id}/forward_backward",
        content=raw.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["category"] == "user"
    assert needle in r.text.lower()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"adam_params": {"eps": 1e-45}}, "eps"),
        ({"learning_rate": 1e30}, "learning_rate"),
        ({"learning_rate": 10.0, "weight_decay": 0.5}, "weight_decay"),
    ],
)
def test_hyper_parameters_that_break_adamw_are_4xx(
    http: httpx.Client, run_id: str, body: dict[str, Any], field: str
) -> None:
    r = http.post(f"/v1/runs/{run_id}/optim_step", json=body)
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text


@pytest.mark.parametrize(
    ("body", "field"),
    [({"alpha": 1e300}, "alpha"), ({"alpha": 0}, "alpha"), ({"seed": 2**64}, "seed")],
)
def test_lora_specs_that_break_the_arithmetic_are_4xx(
    http: httpx.Client, body: dict[str, Any], field: str
) -> None:
    before = len(http.get("/v1/runs").json()["runs"])
    r = http.post("/v1/runs", json={"base_model": "tiny-gpt2", **body})
    assert 400 <= r.status_code < 500, r.text
    assert field in r.text
    assert len(http.get("/v1/runs").json()["runs"]) == before


# Values at the edges of what the schema accepts: each must sample, never fail as `server`.
ACCEPTED_SAMPLING = [
    {"temperature": 1e-39},
    {"temperature": 5e-324},
    {"temperature": 1e-300, "top_p": 0.5},
    {"temperature": 1e300},
    {"temperature": 1.0, "top_p": 1e-300},
    {"temperature": 1.0, "top_p": 5e-324, "top_k": 1},
    {"temperature": 0.7, "top_k": 2**62},
    {"temperature": 1.0, "seed": 2**64 - 1},
    {"temperature": 1.0, "seed": -(2**63)},
]


@pytest.mark.parametrize("params", ACCEPTED_SAMPLING)
def test_every_accepted_sampling_value_samples(http: httpx.Client, params: dict[str, Any]) -> None:
    body = {"prompt_tokens": [5, 17, 42], "max_tokens": 4, "num_samples": 2, **params}
    r = http.post("/v1/sample", json=body)
    assert r.status_code == 202, r.text
    result = result_of(http, r)
    for seq in result["sequences"]:
        assert seq["tokens"] and all(0 <= t < 2048 for t in seq["tokens"])
        assert all(lp <= 0 and math.isfinite(lp) for lp in seq["logprobs"])


def test_a_vanishing_temperature_is_greedy(http: httpx.Client) -> None:
    body = {"prompt_tokens": [5, 17, 42], "max_tokens": 6, "stop": []}
    greedy = result_of(http, http.post("/v1/sample", json={**body, "temperature": 0}))
    tiny = result_of(http, http.post("/v1/sample", json={**body, "temperature": 1e-39}))
    assert tiny["sequences"][0]["tokens"] == greedy["sequences"][0]["tokens"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": [99999]}, "stop"),
    ],
)
def test_sampling_values_beyond_what_computes_are_4xx(
    http: httpx.Client, params: dict[str, Any], field: str
) -> None:
    r = http.post("/v1/sample", json={"prompt_tokens": [5, 17], "max_tokens": 2, **params})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["category"] == "user"
    assert field in r.text


def test_unknown_shaped_model_is_refused_at_submit(http: httpx.Client) -> None:
    r = http.post("/v1/runs", json={"base_model": "shaped:no-such-shape"})
    assert r.status_code == 400 and "shaped:llama-3.1-8b" in r.text


def test_shaped_models_tokenize_with_the_built_in_tokenizer(http: httpx.Client) -> None:
    """A shaped: model (random weights, real shape) samples and decodes with tiny-llama's
    tokenizer, in the web process and on the worker alike (one TokenizerCache)."""
    name = "shaped:llama-3.1-8b"
    got = http.post("/v1/tokenize", json={"base_model": name, "text": "hello world"})
    want = http.post("/v1/tokenize", json={"base_model": "tiny-llama", "text": "hello world"})
    assert got.status_code == 200, got.text
    assert got.json()["tokens"] == want.json()["tokens"]
    files = http.get(f"/v1/models/{name}/tokenizer/tokenizer.json")
    assert files.status_code == 200 and files.json()["model"]


def test_a_run_from_a_state_refuses_a_shape_of_its_own(http: httpx.Client, run_id: str) -> None:
    saved = result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "shape"}))
    for extra in ({"rank": 4}, {"base_model": "tiny-llama"}, {"train_mlp": False}):
        r = http.post("/v1/runs", json={"from_state": saved["path"], **extra})
        assert r.status_code == 422, r.text
        assert "takes the base model and LoRA shape of the state" in r.text
    created = http.post("/v1/runs", json={"from_state": saved["path"]})
    assert result_of(http, created)["lora"]["rank"] == 8
