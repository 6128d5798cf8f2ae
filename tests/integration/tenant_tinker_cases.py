"""The tenant cases of ``/api/v1`` (Tinker's protocol), for ``test_tenants``' walk of every route.

Bob aims at alice's objects through Tinker's endpoints (her Tinker model, its futures, her
``tinker://`` checkpoints, her sampling session): each answers 404, as a missing one does, and
her run is unchanged; alice's own request succeeds. Routes without tenant objects answer every
key alike and refuse a request without one (401).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from tests.integration.tenant_world import TOKENS, World

Case = Callable[[World], None]
CASES: dict[tuple[str, str], Case] = {}
A = "/api/v1"
_MODELS: dict[int, dict[str, str]] = {}


def route(method: str, rule: str) -> Callable[[Case], Case]:
    def add(fn: Case) -> Case:
        CASES[(method, A + rule)] = fn
        return fn

    return add


def _wait(w: World, who: str, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = w.post(who, f"{A}/retrieve_future", {"request_id": request_id})
        assert got.status_code == 200, got.text
        body = got.json()
        if body.get("type") != "try_again":
            assert "error" not in body, body
            return body
    raise AssertionError(f"request {request_id} did not finish")


def tinker_model(w: World) -> dict[str, str]:
    """Alice's Tinker model (made once per world), a future of it and a sampling session."""
    if id(w) not in _MODELS:
        session = w.post("alice", f"{A}/create_session", {}).json()["session_id"]
        created = w.post(
            "alice",
            f"{A}/create_model",
            {
                "session_id": session,
                "model_seq_id": 0,
                "base_model": "tiny-gpt2",
                "lora_config": {"rank": 4},
            },
        ).json()
        _wait(w, "alice", created["request_id"])
        sampler = w.post(
            "alice",
            f"{A}/create_sampling_session",
            {
                "session_id": session,
                "sampling_session_seq_id": 0,
                "model_path": f"tinker://{w.a_run}/sampler_weights/smp",
            },
        ).json()["sampling_session_id"]
        _MODELS[id(w)] = {
            "session": session,
            "model_id": created["model_id"],
            "future": created["request_id"],
            "sampler": sampler,
        }
    return _MODELS[id(w)]


def _fb_body(model_id: str, seq_id: int) -> bytes:
    datum = pb.Datum()
    datum.model_input.add().encoded_text.tokens = bytes(
        b"".join(t.to_bytes(4, "little") for t in TOKENS[:-1])
    )
    for key, values, dtype, fmt in (
        ("target_tokens", TOKENS[1:], pb.DTYPE_INT64, 8),
        ("weights", [1.0] * (len(TOKENS) - 1), pb.DTYPE_FLOAT32, 4),
    ):
        arr = np.asarray(values, dtype="<i8" if fmt == 8 else "<f4")
        datum.loss_fn_inputs[key].dense = arr.tobytes()
        datum.loss_fn_inputs[key].dtype = dtype
    req = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    req.data.append(datum)
    return req.SerializeToString()


def _hidden(w: World, send: Callable[[str], httpx.Response], *, ok: int | None = 200) -> None:
    """Bob gets 404; alice (unless ``ok`` is None) gets ``ok``; alice's run is unchanged."""
    before = w.run_state("alice", w.a_run)
    got = send("bob")
    assert got.status_code == 404, got.text
    assert w.run_state("alice", w.a_run) == before
    if ok is not None:
        mine = send("alice")
        assert mine.status_code == ok, mine.text


def _keyed(w: World, send: Callable[[str], httpx.Response]) -> None:
    """No tenant objects: every key is answered; no key is refused."""
    for who in ("alice", "bob", "admin"):
        got = send(who)
        assert got.status_code == 200, got.text
    assert send("nobody").status_code == 401


@route("POST", "/client/config")
def _config(w: World) -> None:
    _keyed(w, lambda who: w.post(who, f"{A}/client/config", {"sdk_version": "0.38.0"}))
    bare = httpx.post(w.svc.base_url + f"{A}/client/config", json={}, headers={"X-API-Key": "ka"})
    assert bare.status_code == 200  # the SDK's header


@route("POST", "/create_session")
def _session(w: World) -> None:
    _keyed(w, lambda who: w.post(who, f"{A}/create_session", {"tags": []}))


@route("POST", "/session_heartbeat")
def _heartbeat(w: World) -> None:
    _keyed(w, lambda who: w.post(who, f"{A}/session_heartbeat", {"session_id": "x"}))


@route("POST", "/telemetry")
def _telemetry(w: World) -> None:
    _keyed(w, lambda who: w.post(who, f"{A}/telemetry", {"events": []}))


@route("POST", "/sessions/<session_id>/finish")
def _finish(w: World) -> None:
    _keyed(w, lambda who: w.post(who, f"{A}/sessions/s/finish", {"reason": {"type": "success"}}))


@route("GET", "/healthz")
def _healthz(w: World) -> None:
    _keyed(w, lambda who: w.get(who, f"{A}/healthz"))


@route("GET", "/get_server_capabilities")
def _caps(w: World) -> None:
    _keyed(w, lambda who: w.get(who, f"{A}/get_server_capabilities"))


@route("POST", "/create_model")
def _create_model(w: World) -> None:
    m = tinker_model(w)
    body = {"session_id": m["session"], "model_seq_id": 0, "base_model": "tiny-gpt2"}
    _hidden(w, lambda who: w.post(who, f"{A}/create_model", body))


@route("POST", "/get_info")
def _get_info(w: World) -> None:
    body = {"model_id": tinker_model(w)["model_id"]}
    _hidden(w, lambda who: w.post(who, f"{A}/get_info", body))


@route("POST", "/forward_backward")
def _forward_backward(w: World) -> None:
    data = _fb_body(tinker_model(w)["model_id"], 1)
    headers = {"Content-Type": "application/x-protobuf"}
    _hidden(
        w, lambda who: w.client(who).post(f"{A}/forward_backward", content=data, headers=headers)
    )


@route("POST", "/optim_step")
def _optim_step(w: World) -> None:
    body = {"model_id": tinker_model(w)["model_id"], "adam_params": {"learning_rate": 0.01}}
    _hidden(w, lambda who: w.post(who, f"{A}/optim_step", body))


@route("POST", "/save_weights")
def _save_weights(w: World) -> None:
    body = {"model_id": tinker_model(w)["model_id"], "path": "t1"}
    _hidden(w, lambda who: w.post(who, f"{A}/save_weights", body))


@route("POST", "/save_weights_for_sampler")
def _save_for_sampler(w: World) -> None:
    body = {"model_id": tinker_model(w)["model_id"], "path": "t2"}
    _hidden(w, lambda who: w.post(who, f"{A}/save_weights_for_sampler", body))


@route("POST", "/load_weights")
def _load_weights(w: World) -> None:
    path = f"tinker://{w.a_run}/weights/s1"
    body = {"model_id": tinker_model(w)["model_id"], "path": path, "optimizer": False}
    _hidden(w, lambda who: w.post(who, f"{A}/load_weights", body), ok=None)
    via_load = {"session_id": "ses_bob", "model_seq_id": 0, "path": path, "optimizer": True}
    _hidden(w, lambda who: w.post(who, f"{A}/load_weights", via_load), ok=None)


@route("POST", "/retrieve_future")
def _retrieve(w: World) -> None:
    body = {"request_id": tinker_model(w)["future"]}
    _hidden(w, lambda who: w.post(who, f"{A}/retrieve_future", body))
    missing = w.post("bob", f"{A}/retrieve_future", {"request_id": "fut_missing"})
    assert missing.status_code == 404


@route("POST", "/create_sampling_session")
def _sampling_session(w: World) -> None:
    body = {
        "session_id": "ses_x",
        "sampling_session_seq_id": 9,
        "model_path": f"tinker://{w.a_run}/sampler_weights/smp",
    }
    _hidden(w, lambda who: w.post(who, f"{A}/create_sampling_session", body))


@route("GET", "/samplers/<sampler_id>")
def _sampler(w: World) -> None:
    sampler = tinker_model(w)["sampler"]
    _hidden(w, lambda who: w.get(who, f"{A}/samplers/{sampler}"))


@route("POST", "/asample")
def _asample(w: World) -> None:
    body = {
        "sampling_session_id": tinker_model(w)["sampler"],
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": TOKENS}]},
        "num_samples": 1,
        "sampling_params": {"max_tokens": 2},
    }
    _hidden(w, lambda who: w.post(who, f"{A}/asample", body))


@route("GET", "/training_runs")
def _training_runs(w: World) -> None:
    def ids(who: str) -> set[str]:
        got = w.get(who, f"{A}/training_runs", params={"limit": 1000})
        return {r["training_run_id"] for r in got.json()["training_runs"]}

    mine = tinker_model(w)["model_id"]
    assert {mine, w.a_run} <= ids("alice") and {mine, w.a_run} <= ids("admin")
    assert not {mine, w.a_run} & ids("bob")


@route("GET", "/training_runs/<training_run_id>")
def _training_run(w: World) -> None:
    _hidden(w, lambda who: w.get(who, f"{A}/training_runs/{w.a_run}"))


@route("GET", "/training_runs/<training_run_id>/checkpoints")
def _run_checkpoints(w: World) -> None:
    _hidden(w, lambda who: w.get(who, f"{A}/training_runs/{w.a_run}/checkpoints"))


@route("DELETE", "/training_runs/<training_run_id>/checkpoints/<path:checkpoint_id>")
def _delete_checkpoint(w: World) -> None:
    _hidden(
        w, lambda who: w.delete(who, f"{A}/training_runs/{w.a_run}/checkpoints/weights/s1"), ok=None
    )


@route("POST", "/weights_info")
def _weights_info(w: World) -> None:
    body = {"tinker_path": f"tinker://{w.a_run}/weights/s1"}
    _hidden(w, lambda who: w.post(who, f"{A}/weights_info", body))
