"""Per-worker-process state: the engine, the Redis store and the worker's identity.

Model state lives here and only here, inside the worker process. The engine is built lazily on
the first task (the base models themselves load lazily inside the engine).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from config import Settings
from eztinker_tasks.deferred import DeferredReplies
from eztinker_tasks.oplog import OpLog
from eztinker_tasks.prefetch import BeginPrefetch
from eztinker_tasks.progress import ProgressPublisher
from eztinker_tasks.store import Store
from eztinker_tasks.tokenization import TokenizerCache

if TYPE_CHECKING:
    from celery import Celery

    from eztinker_tasks.engine import Backend
    from eztinker_tasks.ranks import RankPlan
    from eztinker_tasks.snapshots import Snapshots


@dataclass
class WorkerRuntime:
    settings: Settings
    store: Store
    engine: Backend  # the interface; Engine (PEFT) is today's implementation
    tokenizers: TokenizerCache
    worker_name: str
    prefetch: BeginPrefetch
    progress: ProgressPublisher  # long operations' progress, for GET /v1/futures/<id>
    oplog: OpLog  # recoverable runs' op logs and snapshot records
    snapshots: Snapshots  # when to snapshot a run, and the thread that writes snapshots
    # The highest seq_id applied to each run by this process: a run applies its operations in
    # seq_id order, so an operation below it can only be a late redelivery (see applying._run_op).
    applied_seq: dict[str, int] = field(default_factory=dict)

    def applied(self, run_id: str, seq_id: int | None) -> None:
        if seq_id is not None and seq_id > self.applied_seq.get(run_id, 0):
            self.applied_seq[run_id] = seq_id


log = logging.getLogger(__name__)
_lock = threading.Lock()
_runtime: WorkerRuntime | None = None
_worker_name = "unnamed"
_device: str | None = None


_plan: RankPlan | None = None  # a multi-GPU worker's ranks (this process is rank 0)


def configure(worker_name: str, device: str | None, rank_plan: RankPlan | None = None) -> None:
    """Called by the worker entry point before Celery starts consuming."""
    global _worker_name, _device, _plan
    _worker_name = worker_name
    _device = device
    _plan = rank_plan


def set_worker_name(name: str) -> None:
    global _worker_name
    _worker_name = name
    if _runtime is not None:
        _runtime.worker_name = name


def get_runtime(app: Celery) -> WorkerRuntime:
    """The process's runtime, built on first use from the app's settings."""
    global _runtime
    with _lock:
        if _runtime is None:
            from eztinker_tasks.snapshots import Snapshots, SnapshotWriter, snapshot_root

            settings: Settings = app.conf.eztinker_settings
            client = redis.Redis.from_url(app.conf.broker_url)
            engine = _engine(settings)
            store = Store(client, settings.result_ttl_s)
            oplog = OpLog(client)
            backend = app.backend
            writer = SnapshotWriter(
                oplog,
                snapshot_root(settings.checkpoints_dir),
                worker=lambda: _worker_name,
                answered=lambda future_id: bool(client.exists(backend.get_key_for_task(future_id))),
            )
            snapshots = Snapshots(
                engine,
                store,
                writer,
                settings.snapshot_interval_s,
                enabled=settings.recovery,
                every_steps=settings.snapshot_every_steps,
            )
            _runtime = WorkerRuntime(
                settings=settings,
                store=store,
                engine=engine,
                tokenizers=TokenizerCache(settings.data_dir, settings.checkpoints_dir),
                worker_name=_worker_name,
                prefetch=BeginPrefetch(store, DeferredReplies(client.connection_pool)),
                progress=ProgressPublisher(client, ttl_s=settings.op_timeout_s + 60),
                oplog=oplog,
                snapshots=snapshots,
            )
        return _runtime


def _engine(settings: Settings) -> Backend:
    """This worker's engine: one device's, or rank 0's of a multi-GPU worker (``ranks``)."""
    from eztinker_tasks.engine import Engine, lockstep
    from eztinker_tasks.engine.distributed import LeadEngine
    from eztinker_tasks.ranks import COLLECTIVE_TIMEOUT_S, Watchdog, engine_config

    if _plan is None:
        return Engine(engine_config(settings, _device or settings.device))
    import torch

    device = _plan.devices[0]
    started: list[LeadEngine] = []

    def on_death(why: str) -> None:
        if started:
            started[0].mark_broken(why)
            return
        # Still joining: the rendezvous would wait for the dead rank for the whole timeout.
        log.error("this multi-GPU worker cannot start: %s", why)
        os._exit(1)

    Watchdog(_plan.followers, on_death).start()
    group = lockstep.init(0, _plan.world, torch.device(device), _plan.init, COLLECTIVE_TIMEOUT_S)
    started.append(LeadEngine(Engine(engine_config(settings, device)), group))
    return started[0]


def peek_runtime() -> WorkerRuntime | None:
    return _runtime


_report: Callable[[], None] | None = None


def set_reporter(report: Callable[[], None]) -> None:
    """The worker's heartbeat, called at once when the set of runs it holds changes."""
    global _report
    _report = report


def report_now() -> None:
    if _report is not None:
        _report()
