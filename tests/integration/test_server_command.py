"""`eztinker server` starts the whole stack on the embedded default and stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from eztinker_tasks.lifeline import die_with_parent
from tests.conftest import free_port, result_of


def _wait_http(url: str, timeout: float = 120.0, ok: int = 200) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == ok:
                return r
            last = r.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready: {last}")


def test_server_command_runs_everything(tmp_path: Path, model_cache: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_cache / "models")
    port, flower_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "EZTINKER_REDIS_URL"} | {
        "EZTINKER_DATA_DIR": str(data_dir),
        "CHECKPOINTS_DIR": str(tmp_path / "ckpt"),
        "EZTINKER_FLOWER_PORT": str(flower_port),
        "OMP_NUM_THREADS": "1",
    }
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "eztinker", "server", "--port", str(port), "--host", "127.0.0.1"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent(),  # a killed test run leaves no server behind
    )
    try:
        base = f"http://127.0.0.1:{port}"
        health = _wait_http(base + "/health").json()
        assert health["broker"]["ok"] is True
        assert [w["device"] for w in health["workers"]] == ["cpu"]

        record = json.loads((data_dir / "broker" / "broker.json").read_text())
        assert "127.0.0.1" in record["url"] and record["url"].startswith("redis://:")
        assert oct((data_dir / "broker" / "broker.json").stat().st_mode & 0o777) == "0o600"
        with httpx.Client(base_url=base, timeout=60) as http:
            created = http.post("/v1/runs", json={})
            assert created.json()["base_model"] == "tiny-gpt2"
            result_of(http, created)
            out = result_of(
                http,
                http.post("/v1/sample", json={"prompt": "Once upon a time,", "max_new_tokens": 5}),
            )
            assert len(out["sequences"][0]["tokens"]) <= 5
        _wait_http(f"http://127.0.0.1:{flower_port}/", timeout=60)
        # Flower turns task events on when it starts; the next operation shows up in it.
        time.sleep(2)
        with httpx.Client(base_url=base, timeout=60) as http:
            sampled = http.post("/v1/sample", json={"prompt": "Hi", "max_tokens": 2})
            result_of(http, sampled)
        future_id = sampled.json()["future_id"]
        deadline = time.monotonic() + 30
        while True:
            page = httpx.get(f"http://127.0.0.1:{flower_port}/task/{future_id}", timeout=5)
            if page.status_code == 200 and "eztinker.sample" in page.text:
                break
            assert time.monotonic() < deadline, "Flower never saw the task"
            time.sleep(1)
        broker_pid = record["pid"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, (tmp_path / "server.log").read_text()[-3000:]
    time.sleep(0.5)
    try:
        os.kill(broker_pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive, "the embedded broker outlived the server"


def test_invalid_setting_fails_at_start_naming_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, "EZTINKER_PORT": "http"}
    out = subprocess.run(
        [sys.executable, "-m", "eztinker", "server"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "EZTINKER_PORT" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_procfile_broker_idles_when_a_redis_is_configured(tmp_path: Path) -> None:
    # honcho stops every process when one exits: with EZTINKER_REDIS_URL set, the Procfile's
    # `broker` line must not exit (nor start a private broker), and must stop on SIGTERM.
    env = {
        **os.environ,
        "EZTINKER_REDIS_URL": "redis://127.0.0.1:1/0",
        "EZTINKER_DATA_DIR": str(tmp_path / "data"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "eztinker", "broker"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(3)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert not (tmp_path / "data" / "broker").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "EZTINKER_REDIS_URL is set" in out


def test_workers_go_to_the_visible_gpus(monkeypatch) -> None:
    from eztinker.server import gpu_ids

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_ids() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_ids() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_ids() == []
