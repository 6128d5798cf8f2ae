"""Runs whose worker is gone: shown ``lost`` with the reason, and ``load`` moves them to a live one.

The two documented launch modes name their workers differently (``eztinker server``: cpu0;
``honcho start``: gpu0), so switching modes leaves every run recorded on a worker that no longer
exists. Here: runs made on worker cpu0, cpu0 stopped, workers gpu0 and gpu1 started.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from typer.testing import CliRunner

from eztinker.cli import app
from tests.conftest import Service, result_of, start_service, wait_future

TOKENS = [5, 17, 42, 99, 7, 300, 12, 64]
FB = {"input_ids": TOKENS, "target_ids": TOKENS}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Service]:
    # Recovery off: the manual path (``load``); test_recovery*.py check automatic recovery.
    svc = start_service(
        tmp_path_factory.mktemp("modes"),
        model_cache,
        workers=1,
        extra_env={"EZTINKER_RECOVERY": "0"},
    )
    yield svc
    svc.stop()


def _cli(svc: Service, *args: str):
    return CliRunner().invoke(app, ["--base-url", svc.base_url, *args], env={"COLUMNS": "100"})


def _create(http: httpx.Client, seed: int) -> str:
    created = http.post("/v1/runs", json={"base_model": "tiny-gpt2", "rank": 4, "seed": seed})
    result_of(http, created)
    return created.json()["run_id"]


def _step(http: httpx.Client, run_id: str) -> str:
    """forward_backward + optim_step; the future id of the optim_step."""
    result_of(http, http.post(f"/v1/runs/{run_id}/forward_backward", json=FB))
    step = http.post(f"/v1/runs/{run_id}/optim_step", json={"learning_rate": 1e-3})
    result_of(http, step)
    return step.json()["future_id"]


def _executed_on(svc: Service, future_id: str) -> str:
    raw = redis.Redis.from_url(svc.redis_url).get(f"ezt:future:{future_id}:started")
    assert raw is not None
    return json.loads(raw)["worker"]


def _runs(http: httpx.Client) -> dict[str, dict[str, Any]]:
    return {r["run_id"]: r for r in http.get("/v1/runs").json()["runs"]}


def test_runs_of_a_stopped_worker_are_lost_and_load_moves_them_to_a_live_one(
    stack: Service,
) -> None:
    with stack.http as http:
        run = _create(http, seed=1)
        _step(http, run)
        saved = result_of(http, http.post(f"/v1/runs/{run}/save", json={"name": "s1"}))
        tokens = http.get(f"/v1/runs/{run}").json()["tokens_trained"]
        bare = _create(http, seed=2)  # never saved
        pair = _create(http, seed=3)
        pair_state = result_of(http, http.post(f"/v1/runs/{pair}/save", json={"name": "p1"}))
        old = http.get(f"/v1/runs/{run}").json()["worker"]

        # Switch launch modes: the old worker stops, workers of other names start.
        proc = stack.processes["worker-cpu0"]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        new = [stack.start_worker("gpu0"), stack.start_worker("gpu1")]
        stack.wait_workers(2, pids={p.pid for p in new})

        # Shown as lost, with the reason, wherever runs are shown.
        info = http.get(f"/v1/runs/{run}").json()
        assert info["status"] == "lost", info
        assert old in info["error"] and "not alive" in info["error"]
        assert saved["path"] in info["error"] and "load" in info["error"]
        listed = _runs(http)
        assert listed[run]["status"] == listed[bare]["status"] == "lost"
        assert listed[run]["error"] == info["error"]
        assert "lost" in _cli(stack, "list").stdout
        shown = _cli(stack, "show", run)
        assert "lost" in shown.stdout and "not alive" in shown.stdout

        # An operation sent now fails at once, saying the way out.
        lost_op = http.post(f"/v1/runs/{run}/forward_backward", json=FB).json()["future_id"]
        error = wait_future(http, lost_op, timeout=30)["error"]
        assert error["code"] == "worker_gone" and "load" in error["message"], error
        cli_op = _cli(stack, "save", run, "late")  # the CLI adds its own command as a hint
        assert cli_op.exit_code == 1 and f"hint: eztinker load {run}" in cli_op.stderr

        # `eztinker load RUN` loads its last state onto a live worker.
        loaded = _cli(stack, "load", run)
        assert loaded.exit_code == 0, loaded.output
        assert f"loaded {saved['path']} into {run}" in loaded.stdout
        info = http.get(f"/v1/runs/{run}").json()
        live = {w["name"] for w in http.get("/health").json()["workers"]}
        assert info["status"] == "ready" and info["error"] is None, info
        assert info["worker"] != old and info["worker"] in live
        assert (info["step"], info["tokens_trained"]) == (1, tokens)
        assert info["worker"] in loaded.stdout
        assert _executed_on(stack, _step(http, run)) == info["worker"]
        assert http.get(f"/v1/runs/{run}").json()["step"] == 2
        shown = _cli(stack, "show", run)
        assert "ready" in shown.stdout and "not alive" not in shown.stdout

        # Concurrent loads of a lost run: one of them moves it, all load on that one worker.
        body = {"path": pair_state["path"]}
        with ThreadPoolExecutor(6) as pool:
            sent = list(pool.map(lambda _: http.post(f"/v1/runs/{pair}/load", json=body), range(6)))
        for response in sent:
            assert result_of(http, response)["step"] == 0
        home = http.get(f"/v1/runs/{pair}").json()["worker"]
        step = {"learning_rate": 1e-3}  # not coalesced: each records the worker that ran it
        futures = [http.post(f"/v1/runs/{pair}/optim_step", json=step) for _ in range(6)]
        for f in futures:
            result_of(http, f)
            assert _executed_on(stack, f.json()["future_id"]) == home

        # A lost run with no state can still be deleted.
        result_of(http, http.delete(f"/v1/runs/{bare}"))
        assert bare not in _runs(http)

        # The old worker coming back does not take back the runs that moved.
        back = stack.start_worker("cpu0")
        stack.wait_workers(3, pids={back.pid})
        info = http.get(f"/v1/runs/{run}").json()
        assert info["status"] == "ready" and info["worker"] != old
        assert _executed_on(stack, _step(http, run)) == info["worker"]


def test_a_lost_run_without_saved_state_says_so(stack: Service) -> None:
    with stack.http as http:
        run = _create(http, seed=4)
        worker = http.get(f"/v1/runs/{run}").json()["worker"]
        proc = stack.processes["worker-" + worker.split("@")[0]]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        info = http.get(f"/v1/runs/{run}").json()
        assert info["status"] == "lost" and "load a saved state" in info["error"]
    out = _cli(stack, "load", run)
    assert out.exit_code == 1
    assert "no saved state" in out.stderr and "eztinker checkpoints" in out.stderr
