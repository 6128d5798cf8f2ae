"""No process of ours outlives the server, however it dies; a new start never trips over what
an earlier one left; a process that dies is restarted; Ctrl-C stops everything cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from eztinker_tasks.broker import BrokerRecord, EmbeddedBroker
from eztinker_tasks.lifeline import die_with_parent
from tests.conftest import free_port, result_of
from tests.integration.procs import (
    alive,
    children,
    cmdline,
    descendants,
    describe,
    end,
    stack_env,
    start_server,
    wait_gone,
)


@pytest.mark.parametrize("kill", ["group", "parent"])
def test_a_killed_server_leaves_nothing_behind_and_starts_again(
    tmp_path: Path, model_cache: Path, kill: str
) -> None:
    env = stack_env(tmp_path, model_cache)
    port = free_port()
    server = start_server(env, tmp_path, port)
    ours: set[int] = set()
    try:
        server.wait_ready()
        ours = descendants(server.process.pid) | {server.broker_pid()}
        assert len(ours) >= 4, describe(ours)  # broker, web (+ its processes), worker
        if kill == "group":
            # A second server on the same data dir would share (and later lose) its broker.
            other = subprocess.run(
                [sys.executable, "-m", "eztinker", "server", "--no-flower",
                 "--port", str(free_port()), "--host", "127.0.0.1"],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert other.returncode == 1, other.stdout + other.stderr
            assert "a broker already runs for data dir" in other.stderr, other.stderr
            assert "Traceback" not in other.stdout + other.stderr
            os.killpg(server.process.pid, signal.SIGKILL)
        else:
            os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        left = wait_gone(ours, 10.0)
        assert not left, f"outlived the server:\n{describe(left)}"

        again = start_server(env, tmp_path, port)  # same data dir, same port
        try:
            again.wait_ready()
            ours |= descendants(again.process.pid) | {again.broker_pid()}
            rc = again.stop(signal.SIGINT)
        finally:
            ours |= again.kill()
        assert rc == 0, again.output()
        assert "Traceback" not in again.output(), again.output()
        left = wait_gone(ours, 5.0)
        assert not left, describe(left)
    finally:
        end(ours | server.kill())


def test_a_process_that_dies_is_restarted(tmp_path: Path, model_cache: Path) -> None:
    env = stack_env(tmp_path, model_cache)
    server = start_server(env, tmp_path, free_port())
    ours: set[int] = set()
    try:
        server.wait_ready()
        ours = descendants(server.process.pid) | {server.broker_pid()}
        # The broker: restarted on the same port, so everyone reconnects.
        broker_pid = server.broker_pid()
        killed_at = time.time()
        os.kill(broker_pid, signal.SIGKILL)
        _wait_for(lambda: server.broker_pid() != broker_pid and _beat_since(server.base, killed_at))
        with httpx.Client(base_url=server.base, timeout=60) as http:  # the worker serves again
            sampled = http.post("/v1/sample", json={"prompt": "Hi", "max_tokens": 2})
            assert len(result_of(http, sampled)["sequences"]) == 1
        # The worker.
        worker_pid = _health(server.base)["workers"][0]["pid"]
        os.kill(worker_pid, signal.SIGKILL)
        _wait_for(lambda: _worker_pids(server.base) not in ([], [worker_pid]))
        # The web server (gunicorn's master: its own processes follow it).
        (web,) = [p for p in children(server.process.pid) if "gunicorn" in cmdline(p)]
        os.kill(web, signal.SIGKILL)
        _wait_for(lambda: web not in children(server.process.pid) and _status(server.base) == "ok")
        ours |= descendants(server.process.pid) | {server.broker_pid()}
        assert server.stop(signal.SIGTERM) == 0, server.output()
        output = server.output()
        for name in ("broker", "worker cpu0", "web"):
            assert f"{name} exited" in output, output
        assert "CPendingDeprecationWarning" not in output, output
        assert not wait_gone(ours, 5.0), describe(ours)
    finally:
        end(ours | server.kill())


def _health(base: str) -> dict:
    try:
        return httpx.get(base + "/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


def _status(base: str) -> str | None:
    return _health(base).get("status")


def _beat_since(base: str, when: float) -> bool:
    """Whether a worker sent a heartbeat after ``when`` (it reconnected to the broker)."""
    workers = _health(base).get("workers", [])
    return any(time.time() - w["last_heartbeat_s"] > when for w in workers)


def _worker_pids(base: str) -> list[int]:
    return [w["pid"] for w in _health(base).get("workers", [])]


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_busy_web_port_fails_at_once_with_a_clear_message(tmp_path: Path) -> None:
    env = stack_env(tmp_path, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "eztinker", "server", "--port", str(port),
             "--host", "127.0.0.1"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, preexec_fn=die_with_parent(),
        )  # fmt: skip
        started: set[int] = set()
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            started = descendants(proc.pid)
            end(started | ({proc.pid} if proc.poll() is None else set()))
    assert proc.returncode == 1 and time.monotonic() - t0 < 30
    assert f"port {port}" in err and "in use" in err, out + err
    assert "Traceback" not in out + err
    assert not started and not (tmp_path / "data" / "broker" / "broker.json").exists()


def _orphan_broker(data_dir: Path) -> BrokerRecord:
    """A broker whose owner is gone and that did not die with it (a crash of an older version,
    or of a system without parent-death signals): its owner process started it and exited."""
    code = (
        "import sys; from pathlib import Path; import eztinker_tasks.broker as b\n"
        "b.die_with_parent = lambda *a: None  # as before this existed\n"
        "b.EmbeddedBroker(Path(sys.argv[1])).start()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(data_dir)], check=True, timeout=60)
    record = BrokerRecord.read(data_dir / "broker" / "broker.json")
    assert record is not None and alive(record.pid)
    return record


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "record-lost"])
def test_a_broker_left_by_a_crash_is_stopped_and_its_data_kept(
    tmp_path: Path, recorded: bool
) -> None:
    leftover = _orphan_broker(tmp_path)
    redis.Redis.from_url(leftover.url).set("ezt:test:kept", "yes")
    if not recorded:
        (tmp_path / "broker" / "broker.json").unlink()
    broker = EmbeddedBroker(tmp_path)
    try:
        record = broker.start()
        assert broker.process is not None, "the leftover was taken for a live broker"
        assert record.pid != leftover.pid
        assert not wait_gone({leftover.pid}, 5.0), "the leftover broker still runs"
        assert redis.Redis.from_url(record.url).get("ezt:test:kept") == b"yes"
    finally:
        broker.stop()
        end({leftover.pid})


def test_a_stale_record_and_a_taken_port_do_not_stop_a_start(tmp_path: Path) -> None:
    first = EmbeddedBroker(tmp_path)
    record = first.start()
    assert first.process is not None
    first.process.kill()  # dies without removing its record
    first.process.wait()
    with socket.socket() as taken:  # and someone else takes its port
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", record.port))
        taken.listen()
        broker = EmbeddedBroker(tmp_path)
        try:
            again = broker.start()
            assert again.port != record.port and again.pid != record.pid
            assert redis.Redis.from_url(again.url).ping()
            saved = json.loads((tmp_path / "broker" / "broker.json").read_text())
            assert saved["port"] == again.port and saved["pid"] == again.pid
        finally:
            broker.stop()


def test_two_starts_at_once_share_one_broker(tmp_path: Path) -> None:
    code = (
        "import sys, time; from pathlib import Path; from eztinker_tasks.broker import "
        "EmbeddedBroker\n"
        "broker = EmbeddedBroker(Path(sys.argv[1])); record = broker.start()\n"
        "print(record.url, record.pid, broker.process is not None, flush=True)\n"
        "time.sleep(3); broker.stop()\n"
    )
    argv = [sys.executable, "-c", code, str(tmp_path)]
    starts = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent())
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].split() for p in starts]
    assert [p.returncode for p in starts] == [0, 0], outs
    assert outs[0][:2] == outs[1][:2], outs  # one URL, one server
    assert sorted(out[2] for out in outs) == ["False", "True"], outs  # one owner


def _broker_command(tmp_path: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "EZTINKER_REDIS_URL"}
    return subprocess.Popen(
        [sys.executable, "-m", "eztinker", "broker"],
        env=env | {"EZTINKER_DATA_DIR": str(tmp_path)},
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=die_with_parent(),
    )  # fmt: skip


def _wait_record(path: Path, proc: subprocess.Popen[str]) -> BrokerRecord:
    deadline = time.monotonic() + 60
    while True:
        record = BrokerRecord.read(path)
        if record is not None and record.pid in children(proc.pid):
            return record
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_the_procfile_broker_takes_its_valkey_with_it(tmp_path: Path, sig: int) -> None:
    # honcho runs `eztinker broker`; it stops it with SIGTERM, then SIGKILL after 5 s.
    proc = _broker_command(tmp_path)
    record = _wait_record(tmp_path / "broker" / "broker.json", proc)
    try:
        t0 = time.monotonic()
        os.kill(proc.pid, sig)
        out, _ = proc.communicate(timeout=30)
        assert not wait_gone({record.pid}, 5.0), "valkey-server outlived `eztinker broker`"
        assert time.monotonic() - t0 < 5, f"took {time.monotonic() - t0:.1f} s"
        if sig != signal.SIGKILL:
            assert proc.returncode == 0 and "Traceback" not in out, out
            assert not (tmp_path / "broker" / "broker.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        end({record.pid})
