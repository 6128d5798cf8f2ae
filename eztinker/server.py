"""``eztinker server``: the whole stack in one command, on the embedded default.

Starts (unless ``EZTINKER_REDIS_URL`` names a Redis) the private broker, then the web server
(gunicorn, gthread), one worker (on GPU 0 if there is one, else on the CPU; ``--workers N``
spreads N workers over the GPUs) and Flower, and supervises them:
a worker or web process that dies is restarted; Ctrl-C stops everything, broker last.
The ``Procfile`` lists the same processes separately for ``honcho start``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any


def gpu_ids() -> list[str]:
    """The GPUs workers may use, as ``CUDA_VISIBLE_DEVICES`` entries.

    The ones already listed in ``CUDA_VISIBLE_DEVICES`` if it is set, else every GPU that
    ``nvidia-smi`` lists.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        return [] if not ids or ids[0] == "-1" else ids
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)]


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool = True
    process: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env)
        print(f"[eztinker] started {self.name} (pid {self.process.pid})", flush=True)


def web_argv(
    host: str, port: int, workers: int, threads: int = 32, access_log: bool = False
) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "gthread", "--workers", str(workers), "--threads", str(threads),
        "--bind", f"{host}:{port}", "--timeout", "120", "--graceful-timeout", "10",
        "--config", "python:eztinker_web.gunicorn_hooks",
        *(["--access-logfile", "-"] if access_log else []), "eztinker_web.wsgi:app",
    ]  # fmt: skip


def worker_argv(name: str, device: str | None, events: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "eztinker", "worker", "--name", name]
    if device:
        argv += ["--device", device]
    if events:
        argv.append("--events")
    return argv


def flower_argv(redis_url: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "--broker", redis_url, "flower",
        "--address=127.0.0.1", f"--port={port}",
    ]  # fmt: skip


def load_settings():
    """Settings from the environment; a bad value exits with one line naming the variable."""
    from config import Settings, SettingsError

    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    flower: bool = True,
    device: str | None = None,
) -> int:
    from eztinker_tasks.broker import EmbeddedBroker

    settings = load_settings()
    host = host or settings.host
    port = port or settings.port
    broker = None
    if settings.redis_url:
        redis_url = settings.redis_url
    else:
        broker = EmbeddedBroker(settings.data_dir)
        redis_url = broker.start().url
        print(f"[eztinker] embedded broker on 127.0.0.1 (data in {broker.dir})", flush=True)
    env = {**os.environ, "EZTINKER_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}

    gpus = gpu_ids()
    n_workers = workers if workers is not None else 1
    web = web_argv(host, port, settings.web_processes(), access_log=settings.access_log)
    children = [Child("web", web, env)]
    for i in range(n_workers):
        worker_env = dict(env)
        if gpus and device is None:
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            children.append(
                Child(f"worker gpu{i}", worker_argv(f"gpu{i}", "cuda", flower), worker_env)
            )
        else:
            dev = device or "cpu"
            kind = "gpu" if dev.startswith("cuda") else "cpu"
            children.append(
                Child(f"worker {kind}{i}", worker_argv(f"{kind}{i}", dev, flower), worker_env)
            )
    if flower:
        children.append(Child("flower", flower_argv(redis_url, settings.flower_port), env))

    stopping = False

    def stop(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.start()
    print(
        f"[eztinker] API on http://{host}:{port} (docs at /docs)"
        + (f", Flower on http://127.0.0.1:{settings.flower_port}" if flower else ""),
        flush=True,
    )
    code = 0
    try:
        while not stopping:
            time.sleep(0.5)
            for child in children:
                assert child.process is not None
                rc = child.process.poll()
                if rc is None or stopping:
                    continue
                now = time.time()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if len(child.restarts) > 5:
                    print(f"[eztinker] {child.name} keeps failing (rc {rc}); stopping", flush=True)
                    stopping, code = True, 1
                    break
                print(f"[eztinker] {child.name} exited with {rc}; restarting", flush=True)
                child.start()
    finally:
        for child in reversed(children):
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                child.process.kill()
        if broker is not None:
            broker.stop()
        print("[eztinker] stopped", flush=True)
    return code


def run_broker() -> int:
    """Run the embedded broker in the foreground (the Procfile's ``broker`` process).

    With ``EZTINKER_REDIS_URL`` set, or a broker already running for this data dir, there is
    nothing to start: it says so and waits for Ctrl-C (honcho stops every process when one
    exits).
    """
    from eztinker_tasks.broker import EmbeddedBroker

    settings = load_settings()

    def stop(signum: int, _: Any) -> None:
        if broker is not None:
            broker.stop()
        sys.exit(0)

    broker: EmbeddedBroker | None = None
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if settings.redis_url:
        print(
            "[eztinker] EZTINKER_REDIS_URL is set: using that Redis, no embedded broker", flush=True
        )
        while True:
            signal.pause()
    broker = EmbeddedBroker(settings.data_dir)
    record = broker.start()
    if broker.process is None:
        print(
            f"[eztinker] a broker already runs for this data dir (pid {record.pid}); using it",
            flush=True,
        )
        broker = None
        while True:
            signal.pause()
    print(f"[eztinker] embedded broker on 127.0.0.1:{record.port} (pid {record.pid})", flush=True)
    broker.process.wait()
    return 0


def run_worker(name: str, device: str | None, loglevel: str, events: bool = False) -> None:
    from eztinker_tasks.broker import resolve_redis_url
    from eztinker_tasks.celery_app import make_celery
    from eztinker_tasks.worker import run_worker as start

    settings = load_settings()
    url = resolve_redis_url(settings, wait_s=60)
    start(make_celery(settings, url), settings, name, device, loglevel, events)


def run_web(host: str | None, port: int | None) -> None:
    settings = load_settings()
    argv = web_argv(
        host or settings.host,
        port or settings.port,
        settings.web_processes(),
        access_log=settings.access_log,
    )
    os.execv(argv[0], argv)


def run_flower() -> None:
    from eztinker_tasks.broker import resolve_redis_url

    settings = load_settings()
    url = resolve_redis_url(settings, wait_s=60)
    argv = flower_argv(url, settings.flower_port)
    os.execv(argv[0], argv)
