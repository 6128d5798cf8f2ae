"""Bad input gets a clear 4xx with one JSON envelope, and the run loses nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import result_of, wait_future

TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]


def _datum(tokens: list[Any], targets: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    targets = targets if targets is not None else [*tokens[1:], 1]
    inputs = {"target_tokens": targets, "weights": [1.0] * len(targets), **extra}
    return {"model_input": {"tokens": tokens}, "loss_fn_inputs": inputs}


def _assert_envelope(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"code", "status", "message", "errors", "category"}, body
    assert body["status"] == status
    assert body["category"] == "user"
    text = (body["message"] + " " + str(body["errors"])).lower()
    for needle in needles:
        assert needle.lower() in text, (needle, body)
    return body


def test_malformed_json(http: httpx.Client, run_id: str) -> None:
    r = http.post(
        f"/v1/runs/{run_id}/forward_backward",
        content=b'{"data": [',
        headers={"Content-Type": "application/json"},
    )
    _assert_envelope(r, 400, "malformed json")


@pytest.mark.parametrize(
    ("path", "body", "status", "needles"),
    [
        ("forward_backward", {"data": [_datum(TOKENS)], "bogus": 1}, 422, ["bogus", "unknown"]),
        ("forward_backward", {"data": "nope"}, 422, ["data"]),
        ("forward_backward", {"data": [_datum([1, 2, "x"])]}, 422, ["integers"]),
        ("forward_backward", {"data": []}, 422, ["empty"]),
        ("forward_backward", {"data": [_datum(TOKENS, TOKENS[:3])]}, 422, ["target_tokens"]),
        ("forward_backward", {"data": [_datum([1, 2, 99999])]}, 400, ["vocabulary", "99999"]),
        ("forward_backward", {"data": [_datum([1, 2, -3])]}, 400, ["vocabulary"]),
        ("forward_backward", {"data": [_datum(list(range(1, 1500)))]}, 400, ["context"]),
        ("forward_backward", {"data": [_datum(TOKENS)], "loss_fn": "nope"}, 400, ["loss_fn"]),
        (
            "forward_backward",
            {"data": [_datum(TOKENS)], "loss_fn": "ppo"},
            400,
            ["advantages"],
        ),
        (
            "forward_backward",
            {"data": [_datum(TOKENS)], "loss_fn_config": {"beta": 1.0}},
            400,
            ["beta"],
        ),
        ("forward_backward", {"input_ids": [1, 2, 3], "target_ids": [1, 2]}, 422, ["labels"]),
        ("optim_step", {"learning_rate": -1.0}, 422, ["learning_rate"]),
        ("optim_step", {"adam_params": {"beta1": 1.5}}, 422, ["beta1"]),
        ("optim_step", {"adam_params": {"eps": 0}}, 422, ["eps"]),
        ("save", {"name": "../escape"}, 400, ["name"]),
        ("save", {"name": "a/b"}, 400, ["name"]),
        ("save", {"name": ".hidden"}, 400, ["name"]),
        ("save", {"name": "x" * 200}, 422, ["name"]),
        ("load", {"path": "../../etc/passwd"}, 400, ["path"]),
    ],
)
def test_bad_run_requests(
    http: httpx.Client, run_id: str, path: str, body: dict, status: int, needles: list[str]
) -> None:
    _assert_envelope(http.post(f"/v1/runs/{run_id}/{path}", json=body), status, *needles)


def test_non_finite_numbers_rejected(http: httpx.Client, run_id: str) -> None:
    raw = (
        '{"data": [{"model_input": {"tokens": [1, 2]}, "loss_fn_inputs": '
        '{"target_tokens": [2, 3], "weights": [1.0, NaN]}}]}'
    )
    r = http.post(
        f"/v1/runs/{run_id}/forward_backward",
        content=raw.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500
    assert r.json()["category"] == "user"
    r = http.post(
        f"/v1/runs/{run_id}/optim_step",
        content=b'{"learning_rate": Infinity}',
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500


def test_too_many_datums(http: httpx.Client, run_id: str) -> None:
    body = {"data": [_datum([1, 2])] * 4097}
    _assert_envelope(http.post(f"/v1/runs/{run_id}/forward", json=body), 400, "4097", "limit")


def test_unknown_things_are_404(http: httpx.Client) -> None:
    _assert_envelope(
        http.post("/v1/runs/run_nope/forward_backward", json={"data": [_datum(TOKENS)]}),
        404,
        "run_nope",
    )
    _assert_envelope(http.get("/v1/runs/run_nope"), 404, "run_nope")
    _assert_envelope(http.get("/v1/futures/fut_never_issued"), 404, "fut_never_issued")
    _assert_envelope(http.get("/v1/runs/r/checkpoints/none"), 404, "checkpoint")
    _assert_envelope(http.post("/v1/sample", json={"prompt": "x", "run_id": "run_nope"}), 404)
    # An unknown checkpoint is a 404 at once, not a future that fails later.
    _assert_envelope(
        http.post("/v1/sample", json={"prompt": "x", "checkpoint": "run_nope/ckpt"}),
        404,
        "run_nope/ckpt",
    )
    _assert_envelope(
        http.post("/v1/compute_logprobs", json={"tokens": [1, 2], "checkpoint": "run_nope/c"}),
        404,
    )
    # A run that never existed has no checkpoint list.
    _assert_envelope(http.get("/v1/runs/run_nope/checkpoints"), 404, "run_nope")


def test_a_deleted_run_still_lists_its_checkpoints(http: httpx.Client) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4})
    result_of(http, created)
    run = created.json()["run_id"]
    result_of(http, http.post(f"/v1/runs/{run}/save", json={"name": "kept"}))
    result_of(http, http.delete(f"/v1/runs/{run}"))
    listed = http.get(f"/v1/runs/{run}/checkpoints")
    assert listed.status_code == 200
    assert [c["name"] for c in listed.json()["checkpoints"]] == ["kept"]
    # ...and operations on it are refused by the submit itself (the run is gone).
    _assert_envelope(
        http.post(f"/v1/runs/{run}/forward_backward", json={"data": [_datum(TOKENS)]}), 404, run
    )


def test_unknown_sampling_model_is_refused(http: httpx.Client) -> None:
    _assert_envelope(
        http.post("/v1/sample", json={"prompt": "x", "base_model": "no such model!"}),
        400,
        "base_model",
    )


def test_body_that_is_not_json_is_refused_not_ignored(http: httpx.Client, run_id: str) -> None:
    # curl -d '...' without -H 'Content-Type: application/json' sends a form content type: the
    # body must not be silently dropped (which would create a run with default settings).
    before = len(http.get("/v1/runs").json()["runs"])
    r = http.post(
        "/v1/runs",
        content=b'{"base_model": "tiny-llama"}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    _assert_envelope(r, 415, "content-type: application/json")
    r = http.post(f"/v1/runs/{run_id}/optim_step", content=b'{"learning_rate": 0.1}')
    _assert_envelope(r, 415, "application/json")
    assert len(http.get("/v1/runs").json()["runs"]) == before


def test_long_poll_over_30_s_is_capped_not_refused(http: httpx.Client, run_id: str) -> None:
    fb = http.post(f"/v1/runs/{run_id}/forward", json={"data": [_datum(TOKENS)]})
    result_of(http, fb)
    r = http.get(f"/v1/futures/{fb.json()['future_id']}", params={"wait": 600})
    assert r.status_code == 200 and r.json()["status"] == "succeeded"
    r = http.post("/v1/futures/batch", json={"future_ids": [fb.json()["future_id"]], "wait": 99})
    assert r.status_code == 200
    _assert_envelope(
        http.get(f"/v1/futures/{fb.json()['future_id']}", params={"wait": -1}), 422, "wait"
    )


def test_sampling_limits(http: httpx.Client) -> None:
    _assert_envelope(
        http.post("/v1/sample", json={"prompt": "x", "num_samples": 100000}), 400, "num_samples"
    )
    _assert_envelope(
        http.post("/v1/sample", json={"prompt": "x", "temperature": -1}), 422, "temperature"
    )
    _assert_envelope(http.post("/v1/sample", json={"prompt_tokens": [1, 99999]}), 400, "vocabulary")
    _assert_envelope(http.post("/v1/sample", json={"prompt": "x", "top_k": 0}), 422, "top_k")
    _assert_envelope(http.post("/v1/sample", json={}), 422, "prompt")
    _assert_envelope(
        http.post("/v1/sample", json={"prompt": "x", "base_model": "a", "run_id": "b"}),
        422,
        "at most one",
    )


def test_body_over_size_limit_is_413(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Any
) -> None:
    from tests.conftest import start_service

    svc = start_service(
        tmp_path_factory.mktemp("small"),
        model_cache,
        extra_env={"EZTINKER_MAX_REQUEST_BYTES": "2000"},
    )
    try:
        with svc.http as http:
            big = {"data": [_datum(list(range(1, 400)))]}
            r = http.post("/v1/runs/run_x/forward_backward", json=big)
            _assert_envelope(r, 413)
    finally:
        svc.stop()


def test_failed_op_resolves_with_user_error_and_run_still_trains(
    http: httpx.Client, run_id: str
) -> None:
    missing = http.post(f"/v1/runs/{run_id}/load", json={"path": f"{run_id}/does-not-exist"})
    _assert_envelope(missing, 404, "does-not-exist")
    # A state of another base model passes the API's checks but fails in the engine: the
    # future resolves with a user error and the run is untouched.
    other = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 8})
    result_of(http, other)
    other_id = other.json()["run_id"]
    saved = result_of(http, http.post(f"/v1/runs/{other_id}/save", json={"name": "llama"}))
    before = http.get(f"/v1/runs/{run_id}").json()["step"]
    bad = http.post(f"/v1/runs/{run_id}/load", json={"path": saved["path"]})
    assert bad.status_code == 202
    body = wait_future(http, bad.json()["future_id"])
    assert body["status"] == "failed"
    assert body["error"]["category"] == "user"
    assert "tiny-llama" in body["error"]["message"]
    fb = http.post(f"/v1/runs/{run_id}/forward_backward", json={"data": [_datum(TOKENS)]})
    first = result_of(http, fb)["metrics"]["loss:sum"]
    result_of(http, http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-2}))
    fb = http.post(f"/v1/runs/{run_id}/forward_backward", json={"data": [_datum(TOKENS)]})
    assert result_of(http, fb)["metrics"]["loss:sum"] < first
    assert http.get(f"/v1/runs/{run_id}").json()["step"] == before + 1


@pytest.mark.parametrize(
    ("path", "raw", "needle"),
    [
        ("/v1/runs", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        ("/v1/runs", b'{"rank": ' + b"9" * 5000 + b"}", "cannot be read"),
        ("/v1/runs", b'{"base_model": "\\ud800"}', "surrogate"),
        ("/v1/sample", b'{"prompt": "a\\udfffb", "max_tokens": 2}', "surrogate"),
        ("/v1/tokenize", b'{"text": "\\uD83D"}', "surrogate"),
    ],
)
def test_json_the_parser_chokes_on_is_a_user_error(
    http: httpx.Client, path: str, raw: bytes, needle: str
) -> None:
    before = len(http.get("/v1/runs").json()["runs"])
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    _assert_envelope(r, 400, needle)
    assert len(http.get("/v1/runs").json()["runs"]) == before
    # A valid pair (an emoji) is text like any other.
    ok = http.post("/v1/tokenize", content=b'{"text": "\\ud83d\\ude00"}',
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/runs", {"train_mlp": 1}, "train_mlp"),
        ("/v1/runs", {"optimizer": "yes"}, "optimizer"),
        ("/v1/runs", {"rank": True}, "rank"),
        ("/v1/runs", {"alpha": "16"}, "alpha"),
        ("/v1/runs", {"seed": 1.0}, "seed"),
        ("optim_step", {"learning_rate": "0.1"}, "learning_rate"),
        ("optim_step", {"seq_id": True}, "seq_id"),
        ("/v1/sample", {"prompt": "x", "prompt_logprobs": 1}, "prompt_logprobs"),
        ("/v1/sample", {"prompt": "x", "temperature": "0"}, "temperature"),
    ],
)
def test_json_types_are_taken_as_the_spec_says_not_coerced(
    http: httpx.Client, run_id: str, path: str, body: dict, field: str
) -> None:
    # marshmallow's own fields take 1 / "yes" for true, true for 1, "0.1" for 0.1: the spec
    # says boolean / integer / number, and a value of another JSON type is refused.
    url = path if path.startswith("/") else f"/v1/runs/{run_id}/{path}"
    before = len(http.get("/v1/runs").json()["runs"])
    body = _assert_envelope(http.post(url, json=body), 422, field)
    assert field in body["errors"]
    assert len(http.get("/v1/runs").json()["runs"]) == before


def test_an_integer_too_large_for_a_float_is_a_user_error(http: httpx.Client, run_id: str) -> None:
    huge = b"1" + b"0" * 400  # parses as a Python int; float() of it overflows (was a 500)
    raw = (
        b'{"data": [{"model_input": {"tokens": [1, 2]}, "loss_fn_inputs": '
        b'{"target_tokens": [2, 3], "weights": [1, ' + huge + b"]}}]}"
    )
    r = http.post(f"/v1/runs/{run_id}/forward_backward", content=raw,
                  headers={"Content-Type": "application/json"})  # fmt: skip
    _assert_envelope(r, 422, "finite")
    r = http.post(f"/v1/runs/{run_id}/optim_step", content=b'{"learning_rate": ' + huge + b"}",
                  headers={"Content-Type": "application/json"})  # fmt: skip
    _assert_envelope(r, 422, "learning_rate")


def test_a_url_too_long_for_the_server_is_a_json_414(http: httpx.Client) -> None:
    # gunicorn answers this itself, before the app: in the same envelope as every error.
    r = http.get("/v1/runs/" + "r" * 5000)
    _assert_envelope(r, 414)
    assert r.headers["content-type"] == "application/json"
    assert r.json()["code"] == "uri_too_long"
    assert http.get("/health").status_code == 200


def test_a_new_run_shows_the_fields_get_shows(http: httpx.Client) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4})
    result_of(http, created)
    body = created.json()
    shown = http.get(f"/v1/runs/{body['run_id']}").json()
    assert set(body) == set(shown) | {"future_id", "job_id"}
    assert (body["checkpoints"], body["last_seq_id"]) == ([], 0)
    assert shown["last_seq_id"] == 0
    result_of(http, http.delete(f"/v1/runs/{body['run_id']}"))
