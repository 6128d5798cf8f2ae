"""Start-up words (a starting worker is reported as starting, not missing) and the Procfile
stack under honcho: Ctrl-C stops every process promptly, without a traceback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from eztinker_tasks.broker import BrokerRecord
from eztinker_tasks.lifeline import die_with_parent
from tests.conftest import REPO, free_port, start_service
from tests.integration.procs import descendants, describe, end, stack_env, wait_gone


def test_a_starting_worker_is_reported_as_starting(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> None:
    # A worker started on its own (as the Procfile does): it says so itself.
    svc = start_service(tmp_path_factory.mktemp("starting"), model_cache, workers=0)
    try:
        worker = svc.start_worker("cpu5")
        name = f"cpu5@{socket.gethostname()}"
        refused = []
        deadline = time.monotonic() + 120
        with svc.http as http:
            while True:
                assert time.monotonic() < deadline and worker.poll() is None
                body = http.get("/health").json()
                if body["workers"]:
                    break
                if body["starting"]:
                    assert body["status"] == "starting", body
                    assert [(w["name"], w["pid"]) for w in body["starting"]] == [
                        (name, worker.pid)
                    ], body
                    assert f"{name} (for" in body["message"], body
                    assert "is starting" in body["message"], body
                    assert "start one with" not in body["message"], body
                    created = http.post("/v1/runs", json={})
                    if created.status_code == 503:
                        refused.append(created.json()["message"])
                time.sleep(0.1)
        assert refused, "never saw the worker starting"
        assert all("is starting" in message for message in refused), refused
        assert body["status"] == "ok" and body["starting"] == [], body
    finally:
        svc.stop()


def _honcho_env(tmp_path: Path, model_cache: Path, port: int, flower_port: int) -> dict[str, str]:
    env = stack_env(
        tmp_path,
        model_cache,
        EZTINKER_PORT=str(port),
        EZTINKER_HOST="127.0.0.1",
        EZTINKER_FLOWER_PORT=str(flower_port),
        EZTINKER_DEVICE="cpu",
    )
    bin_dir = str(Path(sys.executable).parent)  # where `eztinker` is installed
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def test_ctrl_c_under_honcho_stops_everything_promptly_and_quietly(
    tmp_path: Path, model_cache: Path
) -> None:
    port, flower_port = free_port(), free_port()
    env = _honcho_env(tmp_path, model_cache, port, flower_port)
    log = tmp_path / "honcho.log"
    with open(log, "wb") as out:
        honcho = subprocess.Popen(
            [str(Path(sys.executable).parent / "honcho"), "-f", str(REPO / "Procfile"),
             "-d", str(tmp_path), "start"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent(),
        )  # fmt: skip
    ours: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while True:
            assert honcho.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    httpx.get(f"http://127.0.0.1:{flower_port}/", timeout=5)  # Flower is up
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        record = BrokerRecord.read(tmp_path / "data" / "broker" / "broker.json")
        assert record is not None
        ours = descendants(honcho.pid) | {record.pid}
        t0 = time.monotonic()
        os.killpg(honcho.pid, signal.SIGINT)  # Ctrl-C in honcho's terminal
        honcho.wait(30)
        took = time.monotonic() - t0
        output = log.read_text()
        assert "Traceback" not in output, output
        assert "SIGKILL" not in output, output  # honcho had to kill something
        assert "Inspect method" not in output, output  # Flower started before any worker
        assert took < 10, f"took {took:.1f} s:\n{output}"
        assert not wait_gone(ours, 5.0), describe(ours)
    finally:
        ours |= descendants(honcho.pid)
        if honcho.poll() is None:
            os.killpg(honcho.pid, signal.SIGKILL)
        end(ours)


def test_flower_stops_at_once_while_an_inspection_waits(tmp_path: Path) -> None:
    # Flower's inspection of workers waits up to --inspect_timeout (10 s) for replies; under
    # honcho's Ctrl-C the workers stop at the same moment and never reply. Flower must still
    # exit at once on SIGTERM (not outlive the broker, not be SIGKILLed after 5 s).
    from eztinker.processes import flower_argv
    from eztinker_tasks.broker import EmbeddedBroker

    broker = EmbeddedBroker(tmp_path)
    record = broker.start()
    port = free_port()
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:
        flower = subprocess.Popen(
            flower_argv(record.url, port), stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert flower.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        # The page answers at once; the inspection it starts (in Flower's executor threads)
        # has no worker to answer it, so it waits the whole --inspect_timeout.
        httpx.get(f"http://127.0.0.1:{port}/workers?refresh=1", timeout=10).raise_for_status()
        time.sleep(0.5)
        t0 = time.monotonic()
        flower.send_signal(signal.SIGTERM)
        rc = flower.wait(15)
        took = time.monotonic() - t0
        assert rc == 0, log.read_text()
        assert took < 2.0, f"Flower took {took:.1f} s to stop:\n{log.read_text()}"
        assert "shutting down" in log.read_text()
    finally:
        if flower.poll() is None:
            flower.kill()
        broker.stop()
