"""Runs recover by themselves: a killed worker, a restarted server or a renamed worker costs
seconds, never work, and no future hangs (``eztinker_tasks.recovery``).

Each test trains an uninterrupted reference run and the same run (same seed, same data) through
the failure, with the real SDK, and compares the two final adapters (fp32, abs <= 1e-5).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

import eztinker
from eztinker import types
from tests.conftest import free_port
from tests.integration.procs import Server, descendants, end, stack_env, start_server

MODEL = "tiny-llama"
ADAM = types.AdamParams(learning_rate=2e-3)


def tokens_of(step: int, length: int = 12) -> list[int]:
    """The same token ids for a step in every run (a fixed data set)."""
    rng = random.Random(step)
    return [rng.randrange(5, 2000) for _ in range(length)]


def datum(step: int, length: int = 12) -> types.Datum:
    tokens = tokens_of(step, length)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:]},
    )


@dataclass
class Trained:
    run_id: str
    path: str  # the final state checkpoint
    resumed_s: float | None = None  # from the fault to the next op's result


def train(
    service: eztinker.ServiceClient,
    steps: int,
    fault: Callable[[str, str], None] | None = None,
    fault_at: int = -1,
) -> Trained:
    """``steps`` pipelined forward_backward + optim_step; ``fault(run_id, future_id)`` at step
    ``fault_at`` while that step's two ops are in flight (its forward_backward is a long one,
    also in a reference run). Every future must resolve with a result."""
    client = service.create_lora_training_client(MODEL, rank=4, seed=11)
    run_id = client.model_id
    resumed = None
    for step in range(steps):
        batch = [datum(step + 1000 * i, 256) for i in range(48)] if step == fault_at else []
        fb = client.forward_backward(batch or [datum(step)], "cross_entropy")
        opt = client.optim_step(ADAM)
        faulted_at = None
        if step == fault_at and fault is not None:
            fault(run_id, fb.future_id)
            faulted_at = time.monotonic()
        assert fb.result(timeout=180).metrics["loss:sum"] > 0
        opt.result(timeout=180)
        if faulted_at is not None:
            resumed = time.monotonic() - faulted_at
    saved = client.save_state("final").result(timeout=180)
    return Trained(run_id, saved.path, resumed)


def assert_same_adapter(checkpoints: Path, a: str, b: str) -> None:
    ta = load_file(str(checkpoints / a / "adapter_model.safetensors"))
    tb = load_file(str(checkpoints / b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert worst <= 1e-5, worst
    assert any(float(t.abs().max()) > 0 for k, t in tb.items() if "lora_B" in k)  # it trained


def worker_of(base: str, run_id: str) -> dict:
    name = httpx.get(f"{base}/v1/runs/{run_id}").json()["worker"]
    workers = httpx.get(f"{base}/health").json()["workers"]
    return next(w for w in workers if w["name"] == name)


@pytest.fixture
def server(tmp_path: Path, model_cache: Path):
    started: list[Server] = []

    def start(*args: str, **env: str) -> Server:
        environ = stack_env(tmp_path, model_cache, EZTINKER_REHOME_AFTER_S="3", **env)
        srv = start_server(environ, tmp_path, free_port(), *args)
        started.append(srv)
        srv.wait_ready()
        return srv

    yield start
    for srv in started:
        end(descendants(srv.process.pid) | srv.kill())


def test_sigkill_of_the_runs_worker_mid_loop_loses_nothing(server, tmp_path: Path) -> None:
    srv = server("--workers", "2")
    seed = int(os.environ.get("EZTINKER_TEST_SEED", time.time_ns() % 10_000))
    kill_at = random.Random(seed).randrange(5, 55)
    killed: list[int] = []

    def kill(run_id: str, future_id: str) -> None:
        pid = worker_of(srv.base, run_id)["pid"]
        while httpx.get(f"{srv.base}/v1/futures/{future_id}").json()["status"] == "pending":
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        assert httpx.get(f"{srv.base}/v1/futures/{future_id}").json()["status"] == "running"

    with eztinker.ServiceClient(base_url=srv.base) as service:
        reference = train(service, 60, fault_at=kill_at)
        faulted = train(service, 60, kill, kill_at)
    assert killed, "no worker was killed"
    print(f"kill at step {kill_at} (seed {seed}): next op answered {faulted.resumed_s:.1f} s later")
    assert faulted.resumed_s is not None and 0.5 < faulted.resumed_s <= 60, faulted
    assert_same_adapter(tmp_path / "checkpoints", reference.path, faulted.path)
    run = httpx.get(f"{srv.base}/v1/runs/{faulted.run_id}").json()
    assert (run["status"], run["step"], run["error"]) == ("ready", 60, None), run
    assert run["worker"] != "" and killed[0] != worker_of(srv.base, faulted.run_id)["pid"]
    # The metrics history: one point per op, the replayed ones not twice, and the numbers of
    # the run that was never killed.
    points = {}
    for trained in (reference, faulted):
        got = httpx.get(f"{srv.base}/v1/runs/{trained.run_id}/metrics").json()["points"]
        points[trained.run_id] = got
        assert [p["seq_id"] for p in got] == list(range(1, 121)), trained
        assert [(p["op"], p["step"]) for p in got[:4]] == [
            ("forward_backward", 0),
            ("optim_step", 1),
            ("forward_backward", 1),
            ("optim_step", 2),
        ]
    for ref, got in zip(points[reference.run_id], points[faulted.run_id], strict=True):
        assert (ref["op"], ref["step"]) == (got["op"], got["step"])
        for name, value in ref["metrics"].items():
            assert got["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), (ref, got)


def test_a_restarted_server_brings_every_run_back_ready(server, tmp_path: Path) -> None:
    # No periodic snapshots: each worker snapshots its runs as it stops (Ctrl-C).
    srv = server(EZTINKER_SNAPSHOT_INTERVAL_S="3600")
    with eztinker.ServiceClient(base_url=srv.base) as service:
        reference = train(service, 12)
        client = service.create_lora_training_client(MODEL, rank=4, seed=11)
        for step in range(7):
            client.forward_backward([datum(step)], "cross_entropy")
            client.optim_step(ADAM).result(timeout=120)
        run_id = client.model_id
    assert srv.stop(signal.SIGINT) == 0  # Ctrl-C
    assert "snapshotted 2 runs before stopping" in srv.output()
    srv = server(EZTINKER_SNAPSHOT_INTERVAL_S="3600")
    deadline = time.monotonic() + 60
    while (run := httpx.get(f"{srv.base}/v1/runs/{run_id}").json())["status"] != "ready":
        assert run["status"] == "recovering", run
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    assert run["step"] == 7 and run["error"] is None, run
    with eztinker.ServiceClient(base_url=srv.base) as service:
        client = service.create_training_client(run_id)
        for step in range(7, 12):
            client.forward_backward([datum(step)], "cross_entropy")
            client.optim_step(ADAM).result(timeout=120)
        path = client.save_state("final").result(timeout=120).path
    assert_same_adapter(tmp_path / "checkpoints", reference.path, path)
