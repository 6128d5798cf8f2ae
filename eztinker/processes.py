"""The service's processes one by one: ``eztinker broker``, ``worker``, ``web`` and ``flower``.

The ``Procfile`` runs them under honcho (``honcho start``); ``eztinker server`` runs the same
processes under its own supervisor (``eztinker.server``). Here: how each is started, and the
small commands that run one of them in the foreground.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

from eztinker.supervisor import Exits, say


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


def worker_argv(
    name: str, device: str | None, events: bool = False, gpus: str | None = None
) -> list[str]:
    argv = [sys.executable, "-m", "eztinker", "worker", "--name", name]
    if gpus:
        argv += ["--gpus", gpus]
    elif device:
        argv += ["--device", device]
    if events:
        argv.append("--events")
    return argv


def flower_argv(redis_url: str, port: int) -> list[str]:
    return [
        # eztinker.flower_entry: Flower that exits at once on SIGTERM (see that module).
        sys.executable, "-m", "eztinker.flower_entry", "--broker", redis_url, "flower",
        "--address=127.0.0.1", f"--port={port}",
        # A worker busy loading a model answers Flower's start-up inspection late: wait for it
        # (milliseconds) instead of logging "Inspect method ... failed".
        "--inspect_timeout=10000",
    ]  # fmt: skip


def load_settings():
    """Settings from the environment; a bad value exits with one line naming the variable."""
    from config import Settings, SettingsError

    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def log_to_terminal() -> None:
    """What the service's own modules log (the broker's clean-ups, ...) reads like ``say``."""
    logging.basicConfig(level=logging.INFO, format="[eztinker] %(message)s", stream=sys.stdout)


def _quiet_interrupts() -> None:
    """Ctrl-C before the process installs its own handlers ends it without a traceback."""
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))


def run_broker() -> int:
    """Run the embedded broker in the foreground (the Procfile's ``broker`` process).

    With ``EZTINKER_REDIS_URL`` set, or a broker already running for this data dir, there is
    nothing to start: it says so and waits for Ctrl-C (honcho stops every process when one
    exits). A broker that dies is restarted (same port and data). On Ctrl-C / SIGTERM it waits
    a few seconds for the other processes (which honcho stops at the same time) to disconnect,
    so that they stop cleanly, then stops the broker.
    """
    from eztinker_tasks.broker import EmbeddedBroker
    from eztinker_tasks.errors import EZTinkerError

    settings = load_settings()
    log_to_terminal()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if settings.redis_url:
        say("EZTINKER_REDIS_URL is set: using that Redis, no embedded broker")
        while not stop.wait(1.0):
            pass
        return 0
    broker = EmbeddedBroker(settings.data_dir, settings.broker_bind)
    try:
        record = broker.start()
    except EZTinkerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    if broker.process is None:
        say(
            f"a broker already runs for this data dir (pid {record.pid}, started by process "
            f"{record.owner}); using it"
        )
        while not stop.wait(1.0):
            pass
        return 0
    say(f"embedded broker on 127.0.0.1:{record.port} (pid {record.pid})")
    for url in broker.remote_urls(record):
        say(
            f"workers on other hosts: EZTINKER_REDIS_URL={url} "
            f"(<password>: the contents of {broker.password_file})"
        )
    exits = Exits()
    while not stop.wait(0.5):
        if broker.process is not None and broker.process.poll() is None:
            continue
        if exits.failing(time.time()):
            say("the broker keeps failing; stopping")
            return 1
        say("the broker exited; restarting it")
        try:
            record = broker.start()
        except EZTinkerError as exc:
            say(f"the broker could not restart: {exc.message}")
            return 1
    _wait_for_clients(record.url, 4.0)
    broker.stop()
    say("broker stopped")
    return 0


def _wait_for_clients(url: str, timeout_s: float) -> None:
    """Wait until no other client is connected to the broker at ``url`` (at most ``timeout_s``)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(redis.RedisError):
        while len(client.client_list()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)


def run_worker(
    name: str,
    device: str | None,
    loglevel: str,
    events: bool = False,
    gpus: str | None = None,
    ranks: int | None = None,
) -> None:
    """Run one worker in the foreground; exits the process when the worker stops.

    ``gpus`` ("0,1") or ``ranks`` (with ``device`` "cpu"): a multi-GPU worker of that many
    ranks (``eztinker_tasks.ranks``).
    """
    _quiet_interrupts()
    _quiet_progress_bars()
    from eztinker_tasks.broker import resolve_redis_url
    from eztinker_tasks.celery_app import make_celery
    from eztinker_tasks.ranks import plan
    from eztinker_tasks.worker import run_worker as consume

    try:
        rank_plan = plan(gpus, ranks, device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    settings = load_settings()
    url = resolve_redis_url(settings, wait_s=60)
    code = consume(make_celery(settings, url), settings, name, device, loglevel, events, rank_plan)
    # Celery has shut down cleanly by now (queues released, its record removed). What is left
    # is the interpreter tearing down torch's and transformers' objects: seconds for nothing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _quiet_progress_bars() -> None:
    """No progress bars in a worker: Celery logs stderr as WARNING lines, so each update of a
    bar ("Loading weights", "Writing model shards", hub downloads) would become a warning.

    Set before transformers / huggingface_hub are imported; ``HF_HUB_DISABLE_PROGRESS_BARS=0``
    or ``TQDM_DISABLE=0`` in the environment keep them.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # hub and transformers bars
    os.environ.setdefault("TQDM_DISABLE", "1")  # any other library's tqdm bars


def run_web(host: str | None, port: int | None) -> None:
    settings = load_settings()
    argv = web_argv(
        host or settings.host,
        port or settings.port,
        settings.web_processes(),
        access_log=settings.access_log,
    )
    os.execv(argv[0], argv)


def run_flower(wait_for_worker_s: float = 600.0) -> None:
    """Run Flower, once a worker is live (up to ``wait_for_worker_s``).

    Flower asks the workers for their state when it starts; with none up yet, it logs four
    "Inspect method ... failed" warnings and shows an empty worker list.
    """
    _quiet_interrupts()
    import redis

    from eztinker_tasks.broker import resolve_redis_url
    from eztinker_tasks.store import Store

    settings = load_settings()
    url = resolve_redis_url(settings, wait_s=60)
    store = Store(redis.Redis.from_url(url, socket_timeout=2))
    deadline = time.monotonic() + wait_for_worker_s
    waiting = False
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if store.live_workers():
                break
        if not waiting:
            say(f"Flower starts on 127.0.0.1:{settings.flower_port} once a worker is live")
            waiting = True
        time.sleep(0.5)
    argv = flower_argv(url, settings.flower_port)
    os.execv(argv[0], argv)
