"""The seed README's quick start, end to end over HTTP on tiny-gpt2."""

from __future__ import annotations

import httpx

from tests.conftest import Service, result_of, wait_future

SENTENCE_TOKENS = [5, 17, 42, 99, 7, 300, 12, 64, 8, 250, 31, 77]


def test_seed_quickstart_flow(service: Service, http: httpx.Client) -> None:
    health = http.get("/health")
    assert health.status_code == 200
    assert health.json()["workers"][0]["device"] == "cpu"

    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "seed": 0})
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    assert result_of(http, created)["base_model"] == "tiny-gpt2"

    losses = []
    for _ in range(10):
        fb = http.post(
            f"/v1/runs/{run_id}/forward_backward",
            json={"input_ids": SENTENCE_TOKENS, "target_ids": SENTENCE_TOKENS},
        )
        assert fb.status_code == 202, fb.text
        assert fb.json()["job_id"] == fb.json()["future_id"]
        losses.append(result_of(http, fb)["metrics"]["loss:sum"])
        step = http.post(
            f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 2e-3, "weight_decay": 0.01}
        )
        result_of(http, step)
    assert losses[-1] < losses[0] * 0.8, losses
    assert max(losses[5:]) < losses[0], losses

    info = http.get(f"/v1/runs/{run_id}").json()
    assert info["step"] == 10
    assert info["tokens_trained"] == 10 * (len(SENTENCE_TOKENS) - 1)
    assert abs(info["last_loss"] - losses[-1]) < 1e-6

    # The seed's sampling example, as written (no model named: the default model).
    sample = http.post(
        "/v1/sample",
        json={"prompt": "Once upon a time,", "max_new_tokens": 50, "temperature": 0.7},
    )
    out = result_of(http, sample)
    assert len(out["sequences"]) == 1
    seq = out["sequences"][0]
    assert 1 <= len(seq["tokens"]) <= 50
    assert len(seq["logprobs"]) == len(seq["tokens"])
    assert isinstance(seq["text"], str)
    assert seq["stop_reason"] in ("stop", "length")

    saved = result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "checkpoint_v1"}))
    assert saved["path"] == f"{run_id}/checkpoint_v1"
    assert saved["kind"] == "state"
    assert (service.checkpoints_dir / run_id / "checkpoint_v1").is_dir()

    # Greedy samples from the live run and from a new run loaded from the state agree.
    prompt = {"prompt_tokens": SENTENCE_TOKENS[:4], "max_tokens": 8, "temperature": 0.0}
    live = result_of(http, http.post("/v1/sample", json={**prompt, "run_id": run_id}))
    second = http.post("/v1/runs", json={"base_model": "tiny-gpt2"})
    run2 = second.json()["run_id"]
    result_of(http, second)
    loaded = result_of(http, http.post(f"/v1/runs/{run2}/load", json={"path": saved["path"]}))
    assert loaded["step"] == 10
    resumed = result_of(http, http.post("/v1/sample", json={**prompt, "run_id": run2}))
    assert resumed["sequences"][0]["tokens"] == live["sequences"][0]["tokens"]

    # The loaded run keeps training from there.
    fb = http.post(
        f"/v1/runs/{run2}/forward_backward",
        json={"input_ids": SENTENCE_TOKENS, "target_ids": SENTENCE_TOKENS},
    )
    assert result_of(http, fb)["metrics"]["loss:sum"] < losses[0]

    deleted = http.delete(f"/v1/runs/{run_id}")
    assert deleted.status_code == 202
    assert wait_future(http, deleted.json()["future_id"])["status"] == "succeeded"
    assert http.get(f"/v1/runs/{run_id}").status_code == 404
    assert run_id not in [r["run_id"] for r in http.get("/v1/runs").json()["runs"]]
    # Checkpoints stay after the run is deleted.
    listed = http.get("/v1/checkpoints").json()["checkpoints"]
    assert f"{run_id}/checkpoint_v1" in [c["path"] for c in listed]


def test_tinker_datum_form_matches_seed_form(http: httpx.Client) -> None:
    created = http.post("/v1/runs", json={"base_model": "tiny-llama", "rank": 4, "seed": 3})
    run_id = created.json()["run_id"]
    result_of(http, created)
    tokens = SENTENCE_TOKENS
    seed_form = result_of(
        http,
        http.post(f"/v1/runs/{run_id}/forward", json={"input_ids": tokens, "target_ids": tokens}),
    )
    datum = {
        "model_input": {"tokens": tokens[:-1]},
        "loss_fn_inputs": {"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    }
    tinker_form = result_of(http, http.post(f"/v1/runs/{run_id}/forward", json={"data": [datum]}))
    assert seed_form["metrics"]["loss:sum"] == tinker_form["metrics"]["loss:sum"]
    assert seed_form["loss_fn_outputs"] == tinker_form["loss_fn_outputs"]
    # -100 labels are ignored: masking the first half lowers the number of counted tokens.
    labels = [-100] * 6 + tokens[6:]
    masked = result_of(
        http,
        http.post(f"/v1/runs/{run_id}/forward", json={"input_ids": tokens, "target_ids": labels}),
    )
    expected = -sum(tinker_form["loss_fn_outputs"][0]["logprobs"][5:])
    assert abs(masked["metrics"]["loss:sum"] - expected) < 1e-4


def test_tokenize_models_and_docs(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    names = {m["name"] for m in models["models"]}
    assert {"tiny-gpt2", "tiny-llama"} <= names
    assert models["default_model"] == "tiny-gpt2"
    tokens = http.post("/v1/tokenize", json={"text": "Once upon a time,"}).json()["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    text = http.post("/v1/detokenize", json={"tokens": tokens}).json()["text"]
    assert text == "Once upon a time,"
    spec = http.get("/openapi.json").json()
    assert "/v1/runs/{run_id}/forward_backward" in spec["paths"]
    page = http.get("/docs")
    assert page.status_code == 200
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"):
        assert http.get(f"/docs/assets/{asset}").status_code == 200
