"""What a worker logs when operations fail: one line for a user error, the real traceback
(once) for a fault of ours, and no progress bars turned into warnings."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from config import Settings
from eztinker_tasks import names
from eztinker_tasks.broker import EmbeddedBroker
from eztinker_tasks.celery_app import make_celery
from eztinker_tasks.errors import OperationFailed
from eztinker_tasks.lifeline import die_with_parent
from eztinker_tasks.store import Store
from tests.conftest import REPO, Service


def _lines_with(log: Path, needle: str, timeout: float = 10.0) -> list[str]:
    """The lines of ``log`` that contain ``needle`` (waiting up to ``timeout`` for one)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in log.read_text().splitlines() if needle in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def _failure(result, timeout: float = 120.0) -> dict:
    with pytest.raises(OperationFailed) as info:
        result.get(timeout=timeout)
    return json.loads(str(info.value.args[0]))


def test_a_user_error_is_one_info_line_without_traceback(service: Service) -> None:
    assert service.logs is not None
    log = service.logs / "worker-cpu0.log"
    start = len(log.read_text())
    app = make_celery(Settings.from_env({}), service.redis_url)
    task_id = f"fut_{uuid.uuid4().hex}"
    # Sampling a checkpoint that does not exist: the worker finds out (a user error).
    result = app.send_task(
        names.SAMPLE,
        task_id=task_id,
        kwargs={
            "source": {"checkpoint": "run_missing/nothing"},
            "num_samples": 1,
            "params": {"max_tokens": 2},
            "prompt_tokens": [1, 2, 3],
        },
        queue=names.SAMPLE_QUEUE,
    )
    envelope = _failure(result)
    assert envelope["category"] == "user" and envelope["code"] == "checkpoint_not_found"
    lines = _lines_with(log, task_id)
    assert len(lines) == 1, lines
    assert "INFO" in lines[0] and "checkpoint_not_found" in lines[0], lines[0]
    written = log.read_text()[start:]
    assert "Traceback" not in written, written
    assert "ERROR" not in written and "raised unexpected" not in written, written


@pytest.fixture(scope="module")
def faulty_worker(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[tuple[str, str, Path]]:
    """A real worker process (``faulty_worker.py``) on its own broker: (URL, queue, log)."""
    tmp = tmp_path_factory.mktemp("faulty")
    data_dir = tmp / "data"
    data_dir.mkdir()
    (data_dir / "models").symlink_to(model_cache / "models")
    if (model_cache / "tokenizers").exists():
        (data_dir / "tokenizers").symlink_to(model_cache / "tokenizers")
    broker = EmbeddedBroker(data_dir)
    url = broker.start().url
    env = {
        **os.environ,
        "EZTINKER_REDIS_URL": url,
        "EZTINKER_DATA_DIR": str(data_dir),
        "CHECKPOINTS_DIR": str(tmp / "checkpoints"),
        "EZTINKER_WORKER_HEARTBEAT_S": "0.5",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    env.pop("TQDM_DISABLE", None)
    log = tmp / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.faulty_worker", "faulty"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
    name = f"faulty@{socket.gethostname()}"
    try:
        store = Store(redis.Redis.from_url(url))
        deadline = time.monotonic() + 120
        while store.worker(name) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, names.worker_queue(name), log
    finally:
        proc.terminate()
        proc.wait(30)
        broker.stop()


def test_a_server_fault_logs_its_real_traceback_once(faulty_worker: tuple[str, str, Path]) -> None:
    url, queue, log = faulty_worker
    start = len(log.read_text())
    app = make_celery(Settings.from_env({}), url)
    task_id = f"fut_{uuid.uuid4().hex}"
    envelope = _failure(app.send_task("test.crash", task_id=task_id, queue=queue))
    assert envelope["category"] == "server" and envelope["code"] == "internal"
    assert "ZeroDivisionError" in envelope["message"]
    _lines_with(log, task_id)
    written = log.read_text()[start:]
    assert written.count("Traceback") == 1, written
    assert "ERROR" in written and f"test.crash[{task_id}] crashed" in written, written
    # The real traceback: the frame that divided by zero, not only Celery's re-raise.
    assert "in _ratio" in written and "ZeroDivisionError: division by zero" in written, written
    assert "raised unexpected" not in written, written


def test_an_anticipated_server_error_is_one_warning_line(
    faulty_worker: tuple[str, str, Path],
) -> None:
    url, queue, log = faulty_worker
    start = len(log.read_text())
    app = make_celery(Settings.from_env({}), url)
    task_id = f"fut_{uuid.uuid4().hex}"
    envelope = _failure(app.send_task("test.lost", task_id=task_id, queue=queue))
    assert envelope["category"] == "server" and envelope["code"] == "run_state_lost"
    lines = _lines_with(log, task_id)
    assert len(lines) == 1 and "WARNING" in lines[0] and "run_state_lost" in lines[0], lines
    written = log.read_text()[start:]
    assert "Traceback" not in written and "raised unexpected" not in written, written


def test_loading_a_model_logs_no_progress_bars(faulty_worker: tuple[str, str, Path]) -> None:
    url, queue, log = faulty_worker
    start = len(log.read_text())
    app = make_celery(Settings.from_env({}), url)
    result = app.send_task(
        names.SAMPLE,
        kwargs={
            "source": {"base_model": "tiny-llama"},  # loaded now, by this worker
            "num_samples": 1,
            "params": {"max_tokens": 2, "temperature": 0.0},
            "prompt_tokens": [1, 2, 3],
        },
        queue=queue,
    )
    assert len(result.get(timeout=120)["sequences"]) == 1
    written = log.read_text()[start:]
    assert "Loading weights" not in written and "it/s]" not in written, written
    assert "WARNING" not in written, written
