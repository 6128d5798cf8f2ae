"""Shared fixtures: a real EZTinker service (embedded broker, worker process(es), web over HTTP).

``service`` starts, once per test session, the embedded Valkey broker, one CPU worker process and
the real web app under gunicorn on a free port, with the tiny models pre-built into a temporary
data dir. Tests talk to it over HTTP only. ``make_service`` starts extra, private stacks (two
workers, ...) for tests that need their own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from eztinker.processes import web_argv
from eztinker_tasks.lifeline import die_with_parent

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A running stack: its URL, environment, processes and an HTTP client."""

    base_url: str
    env: dict[str, str]
    data_dir: Path
    checkpoints_dir: Path
    redis_url: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    broker: Any = None
    logs: Path | None = None

    @property
    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)

    def start_worker(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        """A CPU worker process; ``extra`` arguments go to ``eztinker worker`` (``--ranks 2``)."""
        assert self.logs is not None
        log = open(self.logs / f"worker-{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "eztinker", "worker", "--name", name, "--device", "cpu", *extra],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=die_with_parent(signal.SIGKILL),  # no worker outlives a killed pytest
        )
        self.processes[f"worker-{name}"] = proc
        return proc

    def wait_workers(
        self, count: int, timeout: float = 180.0, pids: set[int] | None = None
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` workers (and, if given, the processes ``pids``) report alive."""
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                body = httpx.get(self.base_url + "/health", timeout=5).json()
                workers = body.get("workers", [])
                if len(workers) >= count and (pids or set()) <= {w["pid"] for w in workers}:
                    return workers
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{count} workers did not come up: {body}; logs in {self.logs}")

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.broker is not None:
            self.broker.stop()


def wait_future(http: httpx.Client, future_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Long-poll a future until it is done; return its body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/futures/{future_id}", params={"wait": 10}).json()
        if body["status"] in ("succeeded", "failed"):
            return body
    raise AssertionError(f"future {future_id} did not finish in {timeout} s")


def result_of(http: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    """Wait for the future a 202 response names; fail the test if the operation failed."""
    assert response.status_code in (201, 202), response.text
    body = wait_future(http, response.json()["future_id"])
    assert body["status"] == "succeeded", body["error"]
    return body["result"]


def _build_models(data_dir: Path) -> None:
    code = (
        "from pathlib import Path; import sys\n"
        "from eztinker_tasks import catalog\n"
        "from eztinker_tasks.engine.tiny import ensure_tiny_model\n"
        "for spec in catalog.BUILTIN_MODELS.values():\n"
        "    ensure_tiny_model(spec, Path(sys.argv[1]))\n"
        "    catalog.ensure_tokenizer(spec.name, Path(sys.argv[1]))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(data_dir)], check=True, cwd=REPO)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the tiny models built once per session."""
    data_dir = tmp_path_factory.mktemp("data")
    _build_models(data_dir)
    return data_dir


def start_service(
    tmp: Path, model_cache: Path, workers: int = 1, extra_env: dict[str, str] | None = None
) -> Service:
    from eztinker_tasks.broker import EmbeddedBroker

    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    models = data_dir / "models"
    tokenizers = data_dir / "tokenizers"
    if not models.exists():
        models.symlink_to(model_cache / "models")
    if not tokenizers.exists() and (model_cache / "tokenizers").exists():
        tokenizers.symlink_to(model_cache / "tokenizers")
    checkpoints = tmp / "checkpoints"
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    broker = EmbeddedBroker(data_dir)
    record = broker.start()
    port = free_port()
    env = {
        **os.environ,
        "EZTINKER_REDIS_URL": record.url,
        "EZTINKER_DATA_DIR": str(data_dir),
        "CHECKPOINTS_DIR": str(checkpoints),
        "EZTINKER_DEVICE": "cpu",
        "EZTINKER_WORKER_HEARTBEAT_S": "0.5",
        "EZTINKER_WORKER_TTL_S": "4",
        "EZTINKER_BASE_URL": f"http://127.0.0.1:{port}",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    svc = Service(
        base_url=f"http://127.0.0.1:{port}",
        env=env,
        data_dir=data_dir,
        checkpoints_dir=checkpoints,
        redis_url=record.url,
        broker=broker,
        logs=logs,
    )
    web_log = open(logs / "web.log", "ab")  # noqa: SIM115
    svc.processes["web"] = subprocess.Popen(
        web_argv("127.0.0.1", port, workers=1, threads=16),
        env=env, stdout=web_log, stderr=subprocess.STDOUT, cwd=REPO,
        preexec_fn=die_with_parent(),
    )  # fmt: skip
    for i in range(workers):
        svc.start_worker(f"cpu{i}")
    try:
        svc.wait_workers(workers)
    except BaseException:
        svc.stop()
        raise
    return svc


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("service"), model_cache)
    yield svc
    svc.stop()


@pytest.fixture()
def http(service: Service) -> Iterator[httpx.Client]:
    with service.http as client:
        yield client
