"""A model that cannot be loaded: refused at submit when the server can tell, else a failed run.

A private stack with the Hugging Face hub offline and its own cache, which holds one model
(``someorg/cached-model``, a copy of tiny-gpt2's files): a hub id that is not cached is refused
at once; a cached one trains and samples. A model that passes the submit check but fails on the
worker (a broken local directory) makes a ``failed`` run with the real cause, and every later
operation on it answers that cause as a ``user`` error, never as a worker restart.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from eztinker.cli import app
from tests.conftest import Service, result_of, start_service, wait_future

CACHED = "someorg/cached-model"
TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
FB = {"input_ids": TOKENS, "target_ids": TOKENS}


def _hub_cache(root: Path, model_cache: Path, *repo_ids: str) -> Path:
    """A Hugging Face hub cache holding tiny-gpt2's files under each of ``repo_ids``."""
    commit = "0" * 40
    for repo_id in repo_ids:
        repo = root / ("models--" + repo_id.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        shutil.copytree(model_cache / "models" / "tiny-gpt2", repo / "snapshots" / commit)
    return root


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("offline")
    cache = _hub_cache(tmp / "hf", model_cache, CACHED, "someorg/sample-first")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp / "hf-home")}
    svc = start_service(tmp, model_cache, extra_env=env)
    yield svc
    svc.stop()


def _cli(svc: Service, *args: str):
    return CliRunner().invoke(app, ["--base-url", svc.base_url, *args], env={"COLUMNS": "100"})


def _user_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert (body["code"], body["category"]) == (code, "user"), body
    return body


def test_a_hub_model_that_cannot_be_fetched_is_refused_at_submit(offline: Service) -> None:
    with offline.http as http:
        before = {r["run_id"] for r in http.get("/v1/runs").json()["runs"]}
        body = _user_error(http.post("/v1/runs", json={"base_model": "gpt2"}), 404, "unknown_model")
        for needle in ("'gpt2'", "not in the local Hugging Face cache", "HF_HUB_OFFLINE"):
            assert needle in body["message"]
        assert "tiny-gpt2" in body["message"]  # says what to use instead
        assert {r["run_id"] for r in http.get("/v1/runs").json()["runs"]} == before
        sample = {"base_model": "gpt2", "prompt": "Hello", "max_tokens": 2}
        _user_error(http.post("/v1/sample", json=sample), 404, "unknown_model")
        logprobs = {"base_model": "gpt2", "tokens": TOKENS}
        _user_error(http.post("/v1/compute_logprobs", json=logprobs), 404, "unknown_model")
    out = _cli(offline, "sample", "Hello", "--model", "gpt2", "--max-tokens", "2")
    assert out.exit_code == 1
    assert "not in the local Hugging Face cache" in out.stderr
    assert "create a run" not in out.stderr


def test_a_cached_hub_model_samples_text_before_any_run_and_trains(offline: Service) -> None:
    # Never loaded by any worker yet: its tokenizer is written when the worker loads it.
    out = _cli(offline, "sample", "Once upon", "--model", "someorg/sample-first", "--json")
    assert out.exit_code == 0, out.output
    with offline.http as http:
        created = http.post("/v1/runs", json={"base_model": CACHED, "rank": 4})
        assert result_of(http, created)["base_model"] == CACHED
        run_id = created.json()["run_id"]
        assert result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json=FB))
        assert http.get(f"/v1/runs/{run_id}").json()["status"] == "ready"


def _broken_models(root: Path, model_cache: Path) -> dict[str, Path]:
    """Local model directories a worker cannot load, each failing in its own way."""
    empty = root / "empty-model"  # no config: the engine's own UnknownModel
    empty.mkdir()
    corrupt = root / "corrupt-model"  # a weights file that is not safetensors: a library error
    shutil.copytree(model_cache / "models" / "tiny-gpt2", corrupt)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    return {"empty": empty, "corrupt": corrupt}


@pytest.mark.parametrize(
    ("kind", "cause"), [("empty", "could not load model"), ("corrupt", "SafetensorError")]
)
def test_a_run_whose_creation_failed_reports_the_cause_to_every_later_op(
    offline: Service, model_cache: Path, tmp_path: Path, kind: str, cause: str
) -> None:
    model = str(_broken_models(tmp_path, model_cache)[kind])
    with offline.http as http:
        created = http.post("/v1/runs", json={"base_model": model, "rank": 4})
        assert created.status_code == 201, created.text  # a directory: the worker judges it
        run_id = created.json()["run_id"]
        # Pipelined behind the create, as the SDK does: it runs after the create failed.
        queued = http.post(f"/v1/runs/{run_id}/forward_backward", json=FB)
        assert queued.status_code == 202, queued.text
        create = wait_future(http, created.json()["future_id"])
        assert create["status"] == "failed" and cause in create["error"]["message"]

        info = http.get(f"/v1/runs/{run_id}").json()
        assert info["status"] == "failed" and cause in info["error"], info
        assert run_id in {
            r["run_id"] for r in http.get("/v1/runs").json()["runs"] if r["status"] == "failed"
        }

        error = wait_future(http, queued.json()["future_id"])["error"]
        assert (error["code"], error["category"]) == ("run_failed", "user"), error
        assert cause in error["message"] and "restarted" not in error["message"]

        # Later operations are refused at submit with the same cause.
        for path, body in (
            (f"/v1/runs/{run_id}/forward_backward", FB),
            (f"/v1/runs/{run_id}/optim_step", {"learning_rate": 1e-3}),
            ("/v1/sample", {"run_id": run_id, "prompt": "a", "max_tokens": 2}),
        ):
            refused = _user_error(http.post(path, json=body), 409, "run_failed")
            assert cause in refused["message"]
        shown = _cli(offline, "show", run_id)
        assert "failed" in shown.stdout and cause in shown.stdout
        assert result_of(http, http.delete(f"/v1/runs/{run_id}"))["deleted"] is True
