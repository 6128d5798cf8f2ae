"""The unmodified official ``tinker`` SDK against ``/api/v1``: the same numbers as ``/v1``.

Every SDK call runs with a timeout, so a protocol mistake fails the test instead of hanging it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from tests.conftest import Service, result_of, start_service

TIMEOUT_S = 120
TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
ADAM = {"learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


@pytest.fixture()
def client(service: Service, monkeypatch: pytest.MonkeyPatch) -> Iterator[tinker.ServiceClient]:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    with tinker.ServiceClient(base_url=service.base_url, api_key="tml-dummy") as sc:
        yield sc


def _datum(weights: list[float] | None = None, **extra: list[float]) -> types.Datum:
    inputs: dict[str, Any] = {
        "target_tokens": TOKENS[1:],
        "weights": weights or [1.0] * (len(TOKENS) - 1),
        **extra,
    }
    return types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]), loss_fn_inputs=inputs)


def _v1_datum(**extra: list[float]) -> dict[str, Any]:
    inputs = {"target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1), **extra}
    return {"model_input": {"tokens": TOKENS[:-1]}, "loss_fn_inputs": inputs}


def _bounded(fn, *args, **kwargs):
    """Run a blocking SDK call, failing (not hanging) after TIMEOUT_S."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kwargs).result(timeout=TIMEOUT_S)


def test_capabilities_list_the_builtin_models(service: Service) -> None:
    rest = tinker.RestClient(base_url=service.base_url, api_key="tml-dummy")
    caps = _bounded(lambda: rest.get_server_capabilities().result())
    names = {m.model_name for m in caps.supported_models}
    assert {"tiny-gpt2", "tiny-llama"} <= names


def test_training_matches_v1(client: tinker.ServiceClient, http: httpx.Client) -> None:
    tc = _bounded(
        lambda: client.create_lora_training_client(base_model="tiny-gpt2", rank=4, seed=0).result()
    )
    assert tc.model_id.endswith(":train:0")
    tokenizer = _bounded(tc.get_tokenizer)  # offline: the built-in tokenizer directory
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello"

    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 0})
    result_of(http, created)
    run_id = created.json()["run_id"]

    def v1(op: str, body: dict[str, Any]) -> dict[str, Any]:
        return result_of(http, http.post(f"/v1/runs/{run_id}/{op}", json=body))

    sdk_fb = _bounded(lambda: tc.forward_backward([_datum()], "cross_entropy").result())
    v1_fb = v1("forward_backward", {"data": [_v1_datum()], "loss_fn": "cross_entropy"})
    assert sdk_fb.metrics["loss:sum"] == pytest.approx(v1_fb["metrics"]["loss:sum"], abs=1e-5)
    sdk_lp = sdk_fb.loss_fn_outputs[0]["logprobs"].tolist()
    assert sdk_lp == pytest.approx(v1_fb["loss_fn_outputs"][0]["logprobs"], abs=1e-5)

    sdk_step = _bounded(lambda: tc.optim_step(types.AdamParams(**ADAM)).result())
    v1("optim_step", {"adam_params": ADAM})
    assert isinstance(sdk_step.metrics, dict | None)

    # After one identical step, forward (forward_only) and ppo agree too.
    sdk_fw = _bounded(lambda: tc.forward([_datum()], "cross_entropy").result())
    v1_fw = v1("forward", {"data": [_v1_datum()], "loss_fn": "cross_entropy"})
    assert sdk_fw.metrics["loss:sum"] == pytest.approx(v1_fw["metrics"]["loss:sum"], abs=1e-5)
    assert sdk_fw.metrics["loss:sum"] < sdk_fb.metrics["loss:sum"]

    rl = {"logprobs": [-2.0] * (len(TOKENS) - 1), "advantages": [1.0, -0.5] * 3 + [1.0]}
    sdk_ppo = _bounded(lambda: tc.forward_backward([_datum(**rl)], "ppo").result())
    v1_ppo = v1("forward_backward", {"data": [_v1_datum(**rl)], "loss_fn": "ppo"})
    assert sdk_ppo.metrics["loss:sum"] == pytest.approx(v1_ppo["metrics"]["loss:sum"], abs=1e-5)
    assert math.isfinite(sdk_ppo.metrics["loss:sum"])


def test_pipelined_steps_run_in_order(client: tinker.ServiceClient) -> None:
    tc = _bounded(
        lambda: client.create_lora_training_client(base_model="tiny-llama", rank=4, seed=1).result()
    )
    futures = []
    for _ in range(3):
        futures.append(tc.forward_backward([_datum()], "cross_entropy"))
        tc.optim_step(types.AdamParams(**ADAM))
    losses = [_bounded(f.result).metrics["loss:sum"] for f in futures]
    assert losses[2] < losses[0]


def test_bad_input_raises_clearly(client: tinker.ServiceClient) -> None:
    with pytest.raises(tinker.TinkerError, match="no-such-model"):
        _bounded(
            lambda: client.create_lora_training_client(base_model="no-such-model", rank=4).result()
        )
    tc = _bounded(
        lambda: client.create_lora_training_client(base_model="tiny-gpt2", rank=4).result()
    )
    inputs: dict[str, Any] = {"target_tokens": [1, 2], "weights": [1.0, 1.0]}
    bad = types.Datum(model_input=types.ModelInput.from_ints([5, 10**6]), loss_fn_inputs=inputs)
    with pytest.raises(tinker.TinkerError, match="outside the vocabulary"):
        _bounded(lambda: tc.forward_backward([bad], "cross_entropy").result())
    with pytest.raises(tinker.TinkerError, match=r"loss"):
        _bounded(lambda: tc.forward_backward([_datum()], "no_such_loss").result())  # type: ignore[arg-type]


def test_forward_backward_custom_matches_cross_entropy(client: tinker.ServiceClient) -> None:
    """The SDK's client-side custom loss (a forward, then a weighted cross_entropy) works."""
    import torch

    tc = _bounded(
        lambda: client.create_lora_training_client(base_model="tiny-gpt2", rank=4, seed=5).result()
    )

    def nll(data: list[types.Datum], logprobs: list[torch.Tensor]):
        loss = -torch.stack([lp.sum() for lp in logprobs]).sum()
        return loss, {"nll:sum": float(loss.detach())}

    out = _bounded(lambda: tc.forward_backward_custom([_datum()], nll).result())
    plain = _bounded(lambda: tc.forward([_datum()], "cross_entropy").result())
    assert out.metrics["loss:sum"] == pytest.approx(plain.metrics["loss:sum"], abs=1e-4)
    assert out.metrics["surrogate_loss:sum"] == pytest.approx(plain.metrics["loss:sum"], abs=1e-4)


def test_a_failed_operation_raises_request_failed(client: tinker.ServiceClient, tmp_path) -> None:
    """A job that fails on the worker is a RequestFailedError, not an endless re-poll."""
    not_a_model = tmp_path / "empty-model-dir"
    not_a_model.mkdir()
    with pytest.raises(tinker.RequestFailedError):
        _bounded(
            lambda: client.create_lora_training_client(base_model=str(not_a_model), rank=4).result()
        )


def test_a_resubmitted_op_is_applied_once(service: Service, http: httpx.Client) -> None:
    """The SDK resends a submit on timeouts: the same (model, seq_id) is the same future."""
    api = httpx.Client(base_url=service.base_url + "/api/v1", timeout=60)
    session = api.post("/create_session", json={}).json()["session_id"]
    body = {"session_id": session, "model_seq_id": 0, "base_model": "tiny-gpt2"}
    first, again = api.post("/create_model", json=body), api.post("/create_model", json=body)
    assert first.json()["request_id"] == again.json()["request_id"]
    model_id = first.json()["model_id"]
    step = {"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 0.01}}
    a, b = api.post("/optim_step", json=step), api.post("/optim_step", json=step)
    assert a.status_code == b.status_code == 200, a.text
    assert a.json()["request_id"] == b.json()["request_id"]
    poll = {"request_id": a.json()["request_id"]}
    done = api.post("/retrieve_future", json=poll)
    for _ in range(5):  # each poll is held up to 25 s
        if done.json().get("type") != "try_again":
            break
        done = api.post("/retrieve_future", json=poll)
    assert "metrics" in done.json(), done.text

    spec = {"session_id": session, "sampling_session_seq_id": 0, "base_model": "tiny-gpt2"}
    sampler = api.post("/create_sampling_session", json=spec).json()["sampling_session_id"]
    sample = {
        "sampling_session_id": sampler,
        "seq_id": 0,
        "num_samples": 2,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
        "sampling_params": {"max_tokens": 2},
    }
    s1, s2 = api.post("/asample", json=sample), api.post("/asample", json=sample)
    assert s1.json() == s2.json() and len(s1.json()["sample_sequence_ids"]) == 2
    s3 = api.post("/asample", json={**sample, "seq_id": 1})
    assert s3.json()["request_id"] != s1.json()["request_id"]


def test_api_keys_and_tenants(tmp_path, model_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """With keys configured the SDK's X-API-Key must be one of them, and a tenant's Tinker
    models are unknown to another tenant."""
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    svc = start_service(
        tmp_path, model_cache, extra_env={"EZTINKER_API_KEYS": "tml-ka:alice, tml-kb:bob"}
    )
    try:
        with tinker.ServiceClient(base_url=svc.base_url, api_key="tml-ka") as alice:
            tc = _bounded(
                lambda: alice.create_lora_training_client(base_model="tiny-gpt2", rank=4).result()
            )
            loss = _bounded(lambda: tc.forward([_datum()], "cross_entropy").result())
            assert math.isfinite(loss.metrics["loss:sum"])
            bob = tinker.RestClient(base_url=svc.base_url, api_key="tml-kb")
            with pytest.raises(tinker.NotFoundError):
                _bounded(lambda: bob.get_training_run(tc.model_id).result())
            mine = _bounded(
                lambda: (
                    tinker.RestClient(base_url=svc.base_url, api_key="tml-ka")
                    .get_training_run(tc.model_id)
                    .result()
                )
            )
            assert mine.model_owner == "alice"
        stranger = tinker.ServiceClient(base_url=svc.base_url, api_key="tml-nobody")
        with pytest.raises(tinker.AuthenticationError):
            _bounded(lambda: stranger.create_lora_training_client(base_model="tiny-gpt2").result())
    finally:
        svc.stop()
