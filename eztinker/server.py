"""``eztinker server``: the whole stack in one command, on the embedded default.

Starts (unless ``EZTINKER_REDIS_URL`` names a Redis) the private broker, then the web server
(gunicorn, gthread) and one worker (on GPU 0 if there is one, else on the CPU; ``--workers N``
spreads N workers over the GPUs), says when the service is ready (``/health`` lists a live
worker), then starts Flower. It supervises them (``eztinker.supervisor``): a process that dies
is restarted, the broker included; Ctrl-C (or SIGTERM) stops everything, broker last (a second
Ctrl-C kills what is left); if the server itself is killed, its processes die with it.
The ``Procfile`` lists the same processes separately for ``honcho start``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from eztinker.processes import (
    flower_argv,
    load_settings,
    log_to_terminal,
    web_argv,
    worker_argv,
)
from eztinker.supervisor import Child, Exits, Startup, StopRequests, Supervisor, say

if TYPE_CHECKING:
    from config import Settings
    from eztinker_tasks.broker import EmbeddedBroker


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


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound because something listens there already."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _local(host: str) -> str:
    """Where this machine reaches a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def serve(
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    flower: bool = True,
    device: str | None = None,
    gpus_per_worker: int = 1,
) -> int:
    """Run the whole service until Ctrl-C / SIGTERM; the exit status (1: it could not run).

    ``gpus_per_worker`` K > 1: each worker spans K GPUs (``eztinker worker --gpus``).
    """
    import redis

    from eztinker_tasks.store import StartingWorker, Store

    settings = load_settings()
    log_to_terminal()
    host = host or settings.host
    port = port or settings.port
    if port_in_use(host, port):
        print(
            f"error: port {port} on {host} is in use (another eztinker server, or another "
            "program): stop it, or choose another port with --port or EZTINKER_PORT",
            file=sys.stderr,
        )
        return 1
    if flower and port_in_use("127.0.0.1", settings.flower_port):
        say(
            f"Flower is not started: port {settings.flower_port} is in use "
            "(set EZTINKER_FLOWER_PORT to another port, or pass --no-flower)"
        )
        flower = False
    count = workers if workers is not None else 1
    if gpus_per_worker < 1:
        print("error: --gpus-per-worker must be at least 1", file=sys.stderr)
        return 1
    if gpus_per_worker > 1 and _workers({}, count, device, False, gpus_per_worker) is None:
        return 1
    stops = StopRequests()
    stops.install()
    broker, redis_url = _start_broker(settings)
    if redis_url is None:
        return 1
    env = {**os.environ, "EZTINKER_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    web_processes = settings.web_processes()
    web = Child("web", web_argv(host, port, web_processes, access_log=settings.access_log), env)
    worker_children = _workers(env, count, device, flower, gpus_per_worker)
    assert worker_children is not None  # checked before the broker started
    flower_child = Child("flower", flower_argv(redis_url, settings.flower_port), env, optional=True)
    children = [web, *worker_children, *([flower_child] if flower else [])]
    store = Store(redis.Redis.from_url(redis_url, socket_timeout=2), settings.result_ttl_s)

    def announce(child: Child, starting: bool) -> None:
        """Tell /health that this worker is starting (or no longer is)."""
        if child.worker is None:
            return
        with contextlib.suppress(redis.RedisError):
            if starting and child.pid is not None:
                record = StartingWorker(child.worker, child.pid, child.device, time.time())
                store.worker_starting(record, settings.worker_ttl_s)
            else:
                store.forget_starting(child.worker)

    url = f"http://{_local(host)}:{port}"
    startup = Startup(url, worker_children, announce)
    supervisor = Supervisor(children, on_exit=startup.exited)
    for child in children:
        if child is not flower_child:
            child.start()
            startup.launched(child)
    say(
        f"starting: API on {url}, {len(worker_children)} worker(s); "
        "ready once a worker has loaded (this can take a while the first time)"
    )
    broker_exits = Exits()  # the broker is restarted here, not by the supervisor
    try:
        while not stops.count:
            time.sleep(0.2)
            if not supervisor.check():
                break
            if broker is not None and not _keep_broker(broker, broker_exits):
                supervisor.failed = True
                break
            if startup.poll():
                live = ", ".join(sorted(startup.live)) or "none"
                say(
                    f"ready in {time.monotonic() - startup.started:.1f} s: API on {url} "
                    f"(console at {url}/console, docs at {url}/docs); live workers: {live}"
                )
                if flower:
                    flower_child.start()
                    say(f"Flower on http://127.0.0.1:{settings.flower_port}")
    finally:
        say("stopping" + (" (Ctrl-C again to stop at once)" if stops.count else ""))
        supervisor.stop(20.0, force=lambda: stops.count > 1)
        for child in worker_children:
            announce(child, False)
        if broker is not None:
            broker.stop()
        say("stopped")
    return 1 if supervisor.failed else 0


def _start_broker(settings: Settings) -> tuple[EmbeddedBroker | None, str | None]:
    """The embedded broker (started now) and the Redis URL; no URL if it cannot start."""
    from eztinker_tasks.broker import EmbeddedBroker
    from eztinker_tasks.errors import EZTinkerError

    if settings.redis_url:
        return None, settings.redis_url
    broker = EmbeddedBroker(settings.data_dir, settings.broker_bind)
    try:
        record = broker.start()
    except EZTinkerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return None, None
    if broker.process is None:
        print(
            f"error: a broker already runs for data dir {settings.data_dir} (pid {record.pid}, "
            f"started by process {record.owner}: another `eztinker server` or `eztinker "
            "broker`); stop that first, or set EZTINKER_DATA_DIR to another directory",
            file=sys.stderr,
        )
        return None, None
    say(f"embedded broker on 127.0.0.1:{record.port} (data in {broker.dir})")
    for url in broker.remote_urls(record):
        say(
            f"workers on other hosts: EZTINKER_REDIS_URL={url} "
            f"(<password>: the contents of {broker.password_file})"
        )
    return broker, record.url


def _workers(
    env: dict[str, str], count: int, device: str | None, events: bool, per_worker: int = 1
) -> list[Child] | None:
    """``count`` worker processes, spread over the GPUs unless ``device`` says otherwise.

    ``per_worker`` K > 1: worker i spans GPUs iK .. iK+K-1 (None, said why, if too few GPUs).
    A worker gets SIGKILL if the server dies: its broker dies with the server, so it could
    finish nothing, and a running operation would only hold its GPU.
    """
    hostname = socket.gethostname()
    gpus = gpu_ids()
    if per_worker > 1 and (device not in (None, "cuda") or len(gpus) < count * per_worker):
        print(
            f"error: {count} worker(s) of {per_worker} GPUs need {count * per_worker} GPUs; "
            f"this host shows {len(gpus)}",
            file=sys.stderr,
        )
        return None
    children = []
    for i in range(count):
        worker_env = dict(env)
        if per_worker > 1:
            mine = ",".join(gpus[i * per_worker : (i + 1) * per_worker])
            name = f"gpus{mine.replace(',', '-')}"
            children.append(
                Child(
                    f"worker {name}",
                    worker_argv(name, "cuda", events, gpus=mine),
                    worker_env,
                    death_signal=signal.SIGKILL,
                    worker=f"{name}@{hostname}",
                    device="cuda",
                )
            )
            continue
        if gpus and device is None:
            worker_env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            name, dev = f"gpu{i}", "cuda"
        else:
            dev = device or "cpu"
            name = f"{'gpu' if dev.startswith('cuda') else 'cpu'}{i}"
        children.append(
            Child(
                f"worker {name}",
                worker_argv(name, dev, events),
                worker_env,
                death_signal=signal.SIGKILL,
                worker=f"{name}@{hostname}",
                device=dev,
            )
        )
    return children


def _keep_broker(broker: EmbeddedBroker, exits: Exits) -> bool:
    """Restart the embedded broker if it died (same port and data); False if it cannot be."""
    from eztinker_tasks.errors import EZTinkerError

    if broker.process is not None and broker.process.poll() is None:
        return True
    if exits.failing(time.time()):
        say("the broker keeps failing; stopping")
        return False
    say("the broker exited; restarting it")
    try:
        broker.start()
    except EZTinkerError as exc:
        say(f"the broker could not restart: {exc.message}; stopping")
        return False
    return True
