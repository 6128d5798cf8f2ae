"""A GPU (or CPU) worker process: one per device, threads pool, concurrency 1.

Why this pool: prefork would fork after CUDA could be initialised; solo ignores remote control
(``add_consumer``) while a task runs. With threads and concurrency 1 the worker executes one
operation at a time and still answers control messages, which is how run queues get bound to it.

On start the worker records itself as *starting* in Redis (``/health`` says so while it imports
and builds its engine), then consumes the shared sampling queue, its own queue and the queues of
the runs recorded as its own (a restarted worker keeps serving its runs: a recoverable run is
rebuilt from its snapshot and logged ops, ``eztinker_tasks.recovery``; any other is marked
``lost`` until a ``load_state``), and reports a heartbeat to Redis. From its heartbeat thread it
also adopts the recoverable runs of workers that have been gone for ``EZTINKER_REHOME_AFTER_S``.

Logs: one INFO line per failed operation with a user error, a traceback only for a server fault
(see ``eztinker_tasks.task_base``); no progress bars (``eztinker worker`` turns them off).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import warnings
from typing import Any

import redis
from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import task_received, worker_ready, worker_shutdown

from config import Settings
from eztinker_tasks import (  # noqa: F401 - tasks: registers them
    applying,
    names,
    ranks,
    recovery,
    runtime,
    tasks,
)
from eztinker_tasks.errors import EZTinkerError
from eztinker_tasks.store import StartingWorker, Store, WorkerRecord

log = logging.getLogger(__name__)


def free_memory_bytes(device: str) -> int:
    """Free memory where this worker's runs live: the GPU's, or the host's available RAM."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def total_memory_bytes(device: str) -> int:
    """Memory of one device of this worker: the GPU's, or the host's RAM (bytes)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


class Heartbeat(threading.Thread):
    """Writes this worker's record (device, runs held, memory) every few seconds."""

    def __init__(self, app: Celery, name: str, device: str) -> None:
        super().__init__(name="eztinker-heartbeat", daemon=True)
        self.app = app
        self.worker_name = name
        self.device = device
        self.stopped = threading.Event()
        self.started_at = time.time()

    def beat(self) -> None:
        rt = runtime.get_runtime(self.app)
        broken = getattr(rt.engine, "broken", None)
        if broken is not None:  # a rank died: no more placements here (its ops fail at once)
            if not self.stopped.is_set():
                log.error("%s stops advertising itself: %s", self.worker_name, broken)
                self.stopped.set()
                # Shared sampling requests go to the healthy workers from now on.
                self.app.control.cancel_consumer(
                    names.SAMPLE_QUEUE, destination=[self.worker_name], reply=True, timeout=2.0
                )
            rt.store.forget_worker(self.worker_name)
            return
        try:
            runs = tuple(rt.engine.list_runs())
            memory = {k: v for k, v in rt.engine.memory_stats().items() if not k.startswith("run.")}
            memory["free_bytes"] = free_memory_bytes(rt.engine.device)
            memory["device_total_bytes"] = total_memory_bytes(rt.engine.device)
            memory.setdefault("ranks", 1)
        except RuntimeError:  # a dict changed size under us; report next time
            runs, memory = (), {}
        rt.store.heartbeat(
            WorkerRecord(
                name=self.worker_name,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                device=rt.engine.device,
                runs=runs,
                memory=memory,
                started_at=self.started_at,
            ),
            rt.settings.worker_ttl_s,
        )

    def run(self) -> None:
        interval = runtime.get_runtime(self.app).settings.worker_heartbeat_s
        while not self.stopped.is_set():
            try:
                self.beat()
                recovery.adopt_orphans(self.app, runtime.get_runtime(self.app))
            except redis.RedisError as exc:  # keep beating through a broker hiccup
                log.warning("heartbeat failed: %s", exc)
            except Exception:
                log.exception("heartbeat failed")
            self.stopped.wait(interval)


class Starting(threading.Thread):
    """Keeps this worker's *starting* record fresh until its heartbeat begins (``done()``)."""

    def __init__(self, store: Store, record: StartingWorker, settings: Settings) -> None:
        super().__init__(name="eztinker-starting", daemon=True)
        self.store = store
        self.record = record
        self.interval = settings.worker_heartbeat_s
        self.ttl = settings.worker_ttl_s
        self.finished = threading.Event()

    def run(self) -> None:
        while not self.finished.is_set():
            try:
                self.store.worker_starting(self.record, self.ttl)
            except redis.RedisError as exc:
                log.warning("could not record this worker as starting: %s", exc)
            self.finished.wait(self.interval)

    def done(self) -> None:
        self.finished.set()
        try:
            self.store.forget_starting(self.record.name)
        except redis.RedisError as exc:
            log.warning("could not clear this worker's starting record: %s", exc)


_heartbeat: Heartbeat | None = None
_starting: Starting | None = None
_initial_runs: list[str] = []  # the runs whose queues this worker consumes from its start
SWITCH_INTERVAL_S = 0.0005


def _on_ready(sender: Any = None, **_: object) -> None:
    global _heartbeat
    # On every broker reconnect Celery warns (9 lines) that it will cancel running tasks by
    # default in 6.0; celery_app makes that choice explicitly, so the notice is noise. (Set
    # here: Celery's logging set-up, which runs before, turns all its notices back on.)
    warnings.filterwarnings(
        "ignore",
        message=r"\s*In Celery 5\.1 we introduced an optional breaking change",
        category=CPendingDeprecationWarning,
    )
    app: Celery = sender.app
    name: str = sender.hostname
    runtime.set_worker_name(name)
    rt = runtime.get_runtime(app)
    recover: list[tuple[int, str]] = []
    for record in rt.store.runs_of_worker(name):
        if record.status in ("deleted", "failed"):
            continue
        app.control.add_consumer(names.run_queue(record.run_id), destination=[name], reply=False)
        if rt.engine.has_run(record.run_id):
            continue
        if record.recoverable and rt.settings.recovery and rt.oplog.has_log(record.run_id):
            rt.store.update_run(
                record.run_id,
                status="recovering",
                error=f"worker {name} restarted; recovering the run from its snapshot",
            )
            pending = recovery.unanswered(rt, app.backend, record.run_id)
            recover.append((-pending, record.run_id))
        else:
            rt.store.update_run(
                record.run_id,
                status="lost",
                error="worker restarted; in-memory state lost (load_state to resume)",
            )
            log.info("re-bound queue of run %s", record.run_id)
    if recover:  # runs whose futures wait first
        recovery.request_recovery(app, name, [run_id for _, run_id in sorted(recover)])
        log.info("recovering %d runs", len(recover))
    for queue in _moved_away(rt, name):  # adopted by another worker while this one started
        app.control.cancel_consumer(queue, destination=[name], reply=False)
    _heartbeat = Heartbeat(app, name, rt.engine.device)
    runtime.set_reporter(_heartbeat.beat)
    _heartbeat.beat()
    _heartbeat.start()
    if _starting is not None:  # live now: no longer starting
        _starting.done()
    log.info("%s is live on %s", name, rt.engine.device)


def _moved_away(rt: runtime.WorkerRuntime, name: str) -> list[str]:
    """Queues this worker consumes since its start whose run now belongs to another worker."""
    return [
        names.run_queue(run_id)
        for run_id in _initial_runs
        if (record := rt.store.get_run(run_id)) is not None and record.worker != name
    ]


def _on_received(request: Any = None, **_: object) -> None:
    """Send the operation's start-up round trip now (see ``eztinker_tasks.prefetch``)."""
    rt = runtime.peek_runtime()
    if rt is None or request is None:
        return
    try:
        kwargs = request.kwargs if isinstance(request.kwargs, dict) else {}
        spec = applying.expected_begin(str(request.name), str(request.id), kwargs, rt.settings)
        rt.prefetch.send(spec, rt.worker_name)
    except Exception:  # the task makes the round trip itself
        log.exception("begin prefetch failed")


def _on_shutdown(sender: object = None, **_: object) -> None:
    if _starting is not None:
        _starting.done()
    rt = runtime.peek_runtime()
    if rt is not None:  # the last op has finished (warm shutdown): snapshot what changed since
        try:
            taken = rt.snapshots.flush(dict(rt.applied_seq))
            if taken:
                log.info("snapshotted %d runs before stopping", taken)
        except EZTinkerError as exc:  # e.g. a multi-GPU worker with a dead rank
            log.warning("no snapshots before stopping (a restart replays the op log): %s", exc)
        except Exception:
            log.exception("snapshots before stopping failed (a restart replays the op log)")
    if _heartbeat is not None:
        _heartbeat.stopped.set()
        rt = runtime.peek_runtime()
        if rt is not None:
            try:
                rt.store.forget_worker(_heartbeat.worker_name)
            except redis.RedisError as exc:  # the broker went first: the record lapses itself
                log.warning("could not remove this worker's record (%s); it lapses by itself", exc)


def _claim_name(store: Store, name: str) -> None:
    """Make sure no other live worker has this name; drop the record of a killed namesake.

    A killed worker cannot remove its record: /health would list it as live until it lapses.
    Two live workers of one name would share their queues and overwrite each other's record:
    the second exits at once, saying so.
    """
    record = store.worker(name)
    if record is None or record.hostname != socket.gethostname() or record.pid == os.getpid():
        return
    try:
        os.kill(record.pid, 0)
    except ProcessLookupError:
        store.forget_worker(name)
        return
    except PermissionError:
        pass
    print(
        f"error: a worker named {name} already runs (pid {record.pid}); "
        "give this one another --name",
        file=sys.stderr,
    )
    raise SystemExit(1)


def run_worker(
    app: Celery,
    settings: Settings,
    name: str,
    device: str | None,
    loglevel: str = "INFO",
    events: bool = False,
    rank_plan: ranks.RankPlan | None = None,
) -> int:
    """Consume until the worker is stopped; its exit status. ``name``: node name prefix (gpu0).

    ``rank_plan``: a multi-GPU worker; this process is rank 0 and starts the other ranks.
    """
    global _starting
    hostname = f"{name}@{socket.gethostname()}"
    if rank_plan is not None:
        device = rank_plan.devices[0]
        ranks.start_followers(rank_plan, name)
    runtime.configure(hostname, device, rank_plan)
    store = Store(redis.Redis.from_url(app.conf.broker_url), settings.result_ttl_s)
    _claim_name(store, hostname)
    record = StartingWorker(hostname, os.getpid(), device or settings.device, time.time())
    _starting = Starting(store, record, settings)
    _starting.start()
    # The consumer thread hands each message to the pool thread; with CPython's default 5 ms
    # GIL switch interval every hand-off can wait that long. Switch sooner.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # A restarted worker serves its runs' queues again from the start: they are part of its
    # initial queue list (a control broadcast sent during start-up could be missed).
    _initial_runs[:] = [
        r.run_id for r in store.runs_of_worker(hostname) if r.status not in ("deleted", "failed")
    ]
    own_runs = [names.run_queue(run_id) for run_id in _initial_runs]
    queues = [names.SAMPLE_QUEUE, names.worker_queue(hostname), *own_runs]
    # Build the runtime (torch, transformers, the engine: seconds of imports) while Celery
    # starts, so that a restarted worker's first task (recovering its runs) finds it ready.
    threading.Thread(target=_warm_up, args=(app,), name="eztinker-warmup", daemon=True).start()
    worker_ready.connect(_on_ready, weak=False)
    task_received.connect(_on_received, weak=False)
    if loglevel.upper() != "DEBUG":
        # Celery logs two INFO lines per task (received; succeeded, with the result's repr):
        # at hundreds of ops/s that is noise, and formatting it costs a tenth of a millisecond
        # per op. Failures are still logged; Flower shows every task.
        for noisy in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    worker_shutdown.connect(_on_shutdown, weak=False)
    try:
        _consume(app, hostname, queues, loglevel, events)
    except SystemExit as exc:  # Celery's command line ends with sys.exit
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


def _warm_up(app: Celery) -> None:
    try:
        runtime.get_runtime(app)
    except Exception:  # the first task builds it again, and reports what fails
        log.exception("building the worker runtime failed")


def _consume(app: Celery, hostname: str, queues: list[str], loglevel: str, events: bool) -> None:
    app.worker_main(
        [
            "worker",
            "--pool=threads",
            "--concurrency=1",
            f"--hostname={hostname}",
            f"--queues={','.join(queues)}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
            # Task events cost a few publishes per op; they are on from the start when Flower
            # runs beside the worker, so Flower sees every task, not only those after its own
            # enable-events broadcast reaches the worker.
            *(["--task-events"] if events else []),
        ]
    )
