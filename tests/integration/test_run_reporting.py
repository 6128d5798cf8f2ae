"""What the service says about runs is true and reads right for every client.

The list shows each run as ``GET /v1/runs/<id>`` does; a run made from a saved state starts at
that state's step and tokens; errors name no SDK call (curl and CLI users read them too) and
the CLI words its own hints with its own commands.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from eztinker.cli import app
from tests.conftest import Service, result_of

TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
FB = {"input_ids": TOKENS, "target_ids": TOKENS}
# How an SDK call or keyword argument reads: `load_state(...)`, `optimizer=False`.
SDK_WORDING = re.compile(r"\b[a-z_]+\(|\b[a-z_]+=(True|False|None)\b")


def _cli(service: Service, *args: str):
    return CliRunner().invoke(app, ["--base-url", service.base_url, *args], env={"COLUMNS": "100"})


@pytest.fixture(scope="module")
def trained(service: Service) -> dict[str, Any]:
    """A run with two steps, a state checkpoint and a sampler checkpoint."""
    with service.http as http:
        created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": 5})
        result_of(http, created)
        run_id = created.json()["run_id"]
        for _ in range(2):
            result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json=FB))
            result_of(http, http.post(f"/v1/runs/{run_id}/optim_step", json={}))
        state = result_of(http, http.post(f"/v1/runs/{run_id}/save", json={"name": "st"}))
        sampler = result_of(
            http, http.post(f"/v1/runs/{run_id}/save", json={"name": "sm", "kind": "sampler"})
        )
        info = http.get(f"/v1/runs/{run_id}").json()
    return {"run_id": run_id, "state": state["path"], "sampler": sampler["path"], "info": info}


def test_the_list_shows_each_run_as_get_does(
    service: Service, http: httpx.Client, trained: dict[str, Any]
) -> None:
    run_id = trained["run_id"]
    one = http.get(f"/v1/runs/{run_id}").json()
    listed = {r["run_id"]: r for r in http.get("/v1/runs").json()["runs"]}[run_id]
    assert listed == one
    assert {c["path"] for c in one["checkpoints"]} == {trained["state"], trained["sampler"]}
    assert one["last_seq_id"] == 6  # 2 x (forward_backward, optim_step) + 2 saves
    out = _cli(service, "list", "--json")
    assert out.exit_code == 0, out.output
    runs = {r["run_id"]: r for r in json.loads(out.stdout)["runs"]}
    assert {c["path"] for c in runs[run_id]["checkpoints"]} == {
        trained["state"],
        trained["sampler"],
    }


def test_a_run_made_from_a_state_starts_at_its_step_and_tokens(
    service: Service, http: httpx.Client, trained: dict[str, Any]
) -> None:
    source = trained["info"]
    assert source["step"] == 2 and source["tokens_trained"] > 0
    created = http.post("/v1/runs", json={"from_state": trained["state"]})
    result_of(http, created)
    info = http.get(f"/v1/runs/{created.json()['run_id']}").json()
    assert (info["step"], info["tokens_trained"]) == (source["step"], source["tokens_trained"])
    assert info["last_state"] == trained["state"]
    shown = _cli(service, "show", info["run_id"]).stdout
    assert re.search(rf"tokens trained\s+{source['tokens_trained']}\b", shown), shown
    assert re.search(r"step\s+2\b", shown), shown


def test_a_sampler_checkpoint_with_optimizer_state_is_refused_in_neutral_words(
    http: httpx.Client, trained: dict[str, Any]
) -> None:
    run_id, sampler = trained["run_id"], trained["sampler"]
    for response in (
        http.post(f"/v1/runs/{run_id}/load", json={"path": sampler}),
        http.post("/v1/runs", json={"from_state": sampler}),
    ):
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["category"] == "user" and "optimizer" in body["errors"]
        assert "weights only" in body["message"]
        assert not SDK_WORDING.search(body["message"]), body["message"]
    loaded = http.post(f"/v1/runs/{run_id}/load", json={"path": sampler, "optimizer": False})
    assert result_of(http, loaded)["step"] == 2


def test_cli_errors_name_cli_flags(
    service: Service, tmp_path: Path, trained: dict[str, Any]
) -> None:
    run_id = trained["run_id"]
    (tmp_path / "st").mkdir()
    out = _cli(service, "download", run_id, "st", "-o", str(tmp_path))
    assert out.exit_code == 1
    assert "--force" in out.stderr and not SDK_WORDING.search(out.stderr), out.stderr
    assert _cli(service, "download", run_id, "st", "-o", str(tmp_path), "--force").exit_code == 0


def test_tokenizing_for_a_name_that_is_no_model_says_so(http: httpx.Client) -> None:
    r = http.post("/v1/tokenize", json={"text": "hi", "base_model": "no such model!"})
    assert r.status_code == 404, r.text
    assert r.json()["message"].startswith("unknown model 'no such model!'")
    # A hub id no worker has loaded yet: its tokenizer comes with the model.
    r = http.post("/v1/tokenize", json={"text": "hi", "base_model": "someorg/never-loaded"})
    assert r.status_code == 404 and "first loads the model" in r.json()["message"]
    assert "create a run" not in r.json()["message"]
