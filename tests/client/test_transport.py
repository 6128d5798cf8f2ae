"""Transport retries, error mapping, futures and submission order, against a scripted stub
server (no EZTinker behind it)."""

from __future__ import annotations

import asyncio
import time

import pytest

import eztinker
from eztinker import types
from eztinker.errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    EZTinkerAPIError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from eztinker.training_client import TrainingClient
from eztinker.transport import RetryPolicy, Transport
from tests.client.stub import DROP, FAST_RETRY, Recorded, Reply, StubServer
from tests.conftest import free_port

OK = Reply(200, {"ok": True})


def envelope(status: int, message: str, code: str = "x") -> Reply:
    category = "user" if status < 500 else "server"
    return Reply(status, {"code": code, "status": status, "category": category,
                          "message": message, "errors": {}})  # fmt: skip


def transport(stub: StubServer) -> Transport:
    return Transport(stub.url, retry=FAST_RETRY)


def test_get_is_retried_on_5xx_and_dropped_connections(stub: StubServer) -> None:
    stub.on("GET", "/v1/runs", envelope(500, "boom"), DROP, envelope(502, "proxy"), OK)
    assert transport(stub).request("GET", "/v1/runs") == {"ok": True}
    assert len(stub.hits("GET", "/v1/runs")) == 4


def test_retries_are_bounded(stub: StubServer) -> None:
    stub.on("GET", "/v1/runs", envelope(503, "no live worker", "service_unavailable"))
    with pytest.raises(ServiceUnavailableError) as info:
        transport(stub).request("GET", "/v1/runs")
    assert info.value.message == "no live worker" and info.value.category == "server"
    assert len(stub.hits("GET", "/v1/runs")) == FAST_RETRY.max_retries + 1


def test_non_idempotent_post_is_not_resent_when_it_may_have_arrived(stub: StubServer) -> None:
    stub.on("POST", "/v1/runs", envelope(500, "crash"), Reply(201, {"run_id": "r"}))
    with pytest.raises(InternalServerError):
        transport(stub).request("POST", "/v1/runs", json={})
    assert len(stub.hits("POST", "/v1/runs")) == 1
    stub.requests.clear()
    stub.on("POST", "/v1/runs", DROP, Reply(201, {"run_id": "r"}))
    with pytest.raises(APIConnectionError):
        transport(stub).request("POST", "/v1/runs", json={})
    assert len(stub.hits("POST", "/v1/runs")) == 1


def test_post_is_retried_on_429_and_503(stub: StubServer) -> None:
    stub.on(
        "POST", "/v1/runs",
        Reply(429, {"message": "slow down"}, headers={"Retry-After": "0.01"}),
        envelope(503, "broker down"), Reply(201, {"run_id": "r"}),
    )  # fmt: skip
    assert transport(stub).request("POST", "/v1/runs", json={}) == {"run_id": "r"}
    assert len(stub.hits("POST", "/v1/runs")) == 3


def test_a_tenant_limit_429_says_which_limit_and_when_to_retry(stub: StubServer) -> None:
    # Too many unfinished ops (category server): retried, then raised with its Retry-After.
    busy = Reply(
        429,
        {"code": "too_many_queued_ops", "status": 429, "category": "server",
         "message": "tenant 'a' has 3 unfinished operations", "errors": {}},
        headers={"Retry-After": "0.01"},
    )  # fmt: skip
    stub.on("POST", "/v1/sample", busy)
    with pytest.raises(RateLimitError) as info:
        transport(stub).request("POST", "/v1/sample", json={}, idempotent=True)
    assert info.value.code == "too_many_queued_ops" and info.value.retry_after == 0.01
    assert len(stub.hits("POST", "/v1/sample")) == FAST_RETRY.max_retries + 1
    # Too many runs (category user): waiting cannot help, so it is raised at once.
    full = Reply(
        429,
        {"code": "too_many_runs", "status": 429, "category": "user",
         "message": "tenant 'a' holds 2 runs, its limit", "errors": {}},
        headers={"Retry-After": "30"},
    )  # fmt: skip
    stub.on("POST", "/v1/runs", full)
    with pytest.raises(RateLimitError) as info:
        transport(stub).request("POST", "/v1/runs", json={})
    assert info.value.code == "too_many_runs" and info.value.retry_after == 30
    assert info.value.is_user_error and "2 runs" in str(info.value)
    assert len(stub.hits("POST", "/v1/runs")) == 1


def test_idempotent_post_is_retried_with_the_same_body(stub: StubServer) -> None:
    stub.on("POST", "/v1/runs/r/forward_backward", DROP, Reply(202, {"future_id": "f"}))
    out = transport(stub).request(
        "POST", "/v1/runs/r/forward_backward", json={"seq_id": 7}, idempotent=True
    )
    assert out == {"future_id": "f"}
    bodies = [r.json for r in stub.hits("POST", "/v1/runs/r/forward_backward")]
    assert bodies == [{"seq_id": 7}, {"seq_id": 7}]


def test_user_errors_are_raised_at_once_with_the_server_message(stub: StubServer) -> None:
    stub.on("POST", "/v1/sample", envelope(400, "prompt_tokens[0] holds token id 99999"))
    with pytest.raises(BadRequestError) as info:
        transport(stub).request("POST", "/v1/sample", json={}, idempotent=True)
    assert info.value.category == "user" and "99999" in str(info.value)
    assert len(stub.hits("POST", "/v1/sample")) == 1
    stub.on("GET", "/v1/runs/nope", envelope(404, "unknown run 'nope'", "unknown_run"))
    with pytest.raises(NotFoundError) as nf:
        transport(stub).request("GET", "/v1/runs/nope")
    assert nf.value.status == 404 and nf.value.code == "unknown_run"


def test_non_json_error_bodies_still_give_a_message(stub: StubServer) -> None:
    stub.on("GET", "/health", Reply(400, raw=b"Bad gateway thing", content_type="text/plain"))
    with pytest.raises(BadRequestError, match="Bad gateway thing"):
        transport(stub).request("GET", "/health")


def test_a_redirect_is_an_error_not_a_result(stub: StubServer) -> None:
    # The SDK follows no redirects: a proxy or a wrong base URL must not pass its redirect
    # page off as the API's answer.
    stub.on("GET", "/v1/runs", Reply(308, raw=b"", headers={"Location": "https://elsewhere/"}))
    with pytest.raises(EZTinkerAPIError, match=r"redirect .*https://elsewhere/"):
        transport(stub).request("GET", "/v1/runs")


def test_proxy_variables_are_honoured(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stub plays a plain-HTTP forward proxy: it gets the absolute URL and answers.
    stub.on("GET", "/v1/runs", Reply(200, {"runs": []}))
    monkeypatch.setenv("HTTP_PROXY", stub.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    far = Transport("http://eztinker.invalid:8000", retry=FAST_RETRY)
    assert far.request("GET", "/v1/runs") == {"runs": []}
    assert stub.requests[-1].headers.get("Host") == "eztinker.invalid:8000"
    # NO_PROXY hosts go direct (and this one does not exist).
    monkeypatch.setenv("NO_PROXY", "eztinker.invalid")
    with pytest.raises(APIConnectionError):
        Transport("http://eztinker.invalid:8000", retry=FAST_RETRY).request("GET", "/v1/runs")


def test_unreachable_server_raises_a_connection_error() -> None:
    port = free_port()
    t = Transport(f"http://127.0.0.1:{port}", retry=FAST_RETRY)
    started = time.monotonic()
    with pytest.raises(APIConnectionError) as info:
        t.request("GET", "/v1/runs")
    assert "cannot reach" in info.value.message and info.value.category == "server"
    assert time.monotonic() - started < 5


def test_api_key_and_base_url_from_the_environment(
    stub: StubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EZTINKER_BASE_URL", stub.url)
    monkeypatch.setenv("EZTINKER_API_KEY", "sekret")
    stub.on("GET", "/v1/models", Reply(200, {"models": [{"name": "m"}], "default_model": "m"}))
    service = eztinker.ServiceClient(retry=FAST_RETRY)
    assert service.base_url == stub.url
    caps = service.get_server_capabilities()
    assert caps.default_model == "m" and caps.supported_models[0].name == "m"
    assert stub.requests[-1].headers["Authorization"] == "Bearer sekret"
    stub.on("GET", "/v1/runs", envelope(401, "missing or invalid API key", "unauthorized"))
    with pytest.raises(AuthenticationError):
        service.list_runs()


def test_retry_policy_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0, multiplier=2.0, jitter=0.0)
    assert [policy.delay(n) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.delay(0, retry_after=3.0) == 3.0


# -- futures -------------------------------------------------------------------------------------
def future_body(status: str, result: object = None, error: object = None) -> Reply:
    return Reply(200, {"future_id": "f1", "status": status, "result": result, "error": error})


def test_future_polls_until_done_and_converts(stub: StubServer) -> None:
    stub.on(
        "GET", "/v1/futures/f1",
        future_body("pending"), DROP, future_body("running"),
        future_body("succeeded", {"metrics": {"step": 1}}),
    )  # fmt: skip
    fut = eztinker.APIFuture(transport(stub), "f1", types.OptimStepResponse.from_json)
    assert fut.result(timeout=10).metrics == {"step": 1}
    assert fut.done() and fut.result().metrics == {"step": 1}  # cached: no more polls
    polls = stub.hits("GET", "/v1/futures/f1")
    assert len(polls) == 4 and all(float(p.query["wait"]) <= 30 for p in polls)


def test_failed_future_raises_with_its_category(stub: StubServer) -> None:
    error = {"code": "invalid_request", "category": "user", "message": "token id 5000 outside"}
    stub.on("GET", "/v1/futures/f1", future_body("failed", error=error))
    fut = eztinker.APIFuture(transport(stub), "f1")
    with pytest.raises(BadRequestError) as info:
        fut.result()
    assert info.value.category == "user" and info.value.future_id == "f1"
    assert "5000" in info.value.message


def test_future_timeout_and_await(stub: StubServer) -> None:
    stub.on("GET", "/v1/futures/f1", future_body("pending"))
    fut = eztinker.APIFuture(transport(stub), "f1")
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.2)
    assert not fut.done() and fut.status() == "pending"
    stub.on("GET", "/v1/futures/f1", future_body("succeeded", {"x": 1}))

    async def main() -> object:
        return await fut

    assert asyncio.run(main()) == {"x": 1}


# -- submission order and seq_ids ---------------------------------------------------------------
def _submitted(rec: Recorded) -> Reply:
    seq = rec.json.get("seq_id")
    return Reply(202, {"future_id": f"fut{seq}", "seq_id": seq if seq else 41, "run_id": "r"})


def test_training_ops_carry_increasing_seq_ids_in_call_order(stub: StubServer) -> None:
    for op in ("forward_backward", "optim_step", "save", "load", "forward"):
        stub.on("POST", f"/v1/runs/r/{op}", _submitted)
    tc = TrainingClient(transport(stub), "r", "tiny-gpt2")
    datum = types.Datum(types.ModelInput.from_ints([1, 2]), {"target_tokens": [2, 3]})
    futures = []
    for _ in range(3):
        futures.append(tc.forward_backward([datum]))
        futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-3)))
    futures.append(tc.save_state("ck"))
    futures.append(tc.load_state("r/ck"))

    async def submit_async() -> list[eztinker.APIFuture]:
        pending = [tc.forward_async([datum]), tc.optim_step_async()]
        return list(await asyncio.gather(*pending))

    futures += asyncio.run(submit_async())
    posts = [r for r in stub.requests if r.method == "POST"]
    assert [r.json["seq_id"] for r in posts] == list(range(1, 11))
    assert [r.path.rsplit("/", 1)[1] for r in posts][:3] == [
        "forward_backward", "optim_step", "forward_backward",
    ]  # fmt: skip
    assert [f.future_id for f in futures] == [f"fut{i}" for i in range(1, 11)]
    assert posts[0].json["data"][0] == {
        "model_input": {"tokens": [1, 2]},
        "loss_fn_inputs": {"target_tokens": [2, 3]},
    }
    assert posts[1].json["adam_params"]["learning_rate"] == 1e-3
    assert posts[7].json == {"path": "r/ck", "optimizer": False, "seq_id": 8}


def test_attached_client_learns_the_seq_id_from_the_server(stub: StubServer) -> None:
    stub.on("POST", "/v1/runs/r/optim_step", _submitted)
    tc = TrainingClient(transport(stub), "r", next_seq_id=None)
    tc.optim_step()
    tc.optim_step()
    seqs = [r.json.get("seq_id") for r in stub.hits("POST", "/v1/runs/r/optim_step")]
    assert seqs == [None, 42]


def test_a_rejected_submit_raises_in_the_caller(stub: StubServer) -> None:
    stub.on("POST", "/v1/runs/r/optim_step", envelope(404, "unknown run 'r'", "unknown_run"))
    tc = TrainingClient(transport(stub), "r")
    with pytest.raises(NotFoundError, match="unknown run"):
        tc.optim_step()
