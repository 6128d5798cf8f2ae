"""Automatic recovery: a run whose worker died comes back by itself, with nothing lost.

A recoverable run (``RunRecord.recoverable``, on unless ``EZTINKER_RECOVERY=0``) keeps a log
of its op messages and a recent snapshot (``eztinker_tasks.oplog``, ``eztinker_tasks.snapshots``).
When its worker dies (SIGKILL, OOM, host loss) or stops:

- the same worker, restarted under its name, recovers each of its runs at once
  (``worker._on_ready`` queues a ``recover_run`` per run on its own queue, runs with
  unanswered ops first);
- otherwise, once the worker has been gone ``EZTINKER_REHOME_AFTER_S`` (and is not starting
  again), a live worker adopts the run (``adopt_orphans``, from its heartbeat thread): it
  records itself as the run's worker (compare-and-set: one adopter wins), binds the run's
  queue and queues the ``recover_run``.

``recover`` rebuilds the run: it loads the newest snapshot (or replays the run's creation),
then applies every logged op after it in seq_id order. An op that was answered already is
applied again only if it changes the run's state (``create_run``, ``forward_backward``,
``optim_step``, ``load``), and its stored result is kept; an op that had no answer (it was
running, or still queued) is applied and answered now, its message taken off the queue: the
futures of the dead worker resolve with their real results. An op that was running when its
worker died twice is not run a third time: it fails (``op_crashed_worker``). Afterwards the
run is ``ready`` again and snapshotted, and its queue is served as usual.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from eztinker_tasks import messages, names
from eztinker_tasks.errors import (
    EZTinkerError,
    InternalError,
    OperationCrashed,
    OperationFailed,
    RunFailed,
    RunStateLost,
)
from eztinker_tasks.metrics_history import record_point
from eztinker_tasks.oplog import LoggedOp
from eztinker_tasks.result_backend import ResultBackend
from eztinker_tasks.runtime import WorkerRuntime, report_now
from eztinker_tasks.types import AdamParams, CallSpec, Datum, LoraSpec

log = logging.getLogger(__name__)

# Ops that change a run's state: replayed even when they were answered already.
STATEFUL = frozenset({names.CREATE_RUN, names.FORWARD_BACKWARD, names.OPTIM_STEP, names.LOAD})


@dataclass(frozen=True)
class Recovered:
    """What ``recover`` did: the snapshot it started from, the ops replayed and answered."""

    run_id: str
    recovered: bool
    from_seq_id: int | None = None  # the snapshot's seq_id (None: from the run's creation)
    replayed: list[int] = field(default_factory=list)  # seq_ids applied again
    answered: list[int] = field(default_factory=list)  # seq_ids answered by this recovery
    failed: list[int] = field(default_factory=list)  # seq_ids answered with an error
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def create_run_now(
    rt: WorkerRuntime,
    run_id: str,
    base_model: str | None,
    lora: Mapping[str, Any] | None,
    from_checkpoint: str | None,
    optimizer: bool,
    status: str = "ready",
) -> dict[str, Any]:
    """Build the run in the engine and record it ``status`` (``failed``, with the cause, if it
    cannot be built: never left ``creating``). Returns the run's info."""
    if rt.engine.has_run(run_id):
        return rt.engine.run_info(run_id).to_dict()
    try:
        if from_checkpoint:
            info = rt.engine.create_run_from_checkpoint(run_id, from_checkpoint, optimizer)
        else:
            assert base_model is not None
            info = rt.engine.create_run(run_id, base_model, LoraSpec.from_dict(dict(lora or {})))
    except Exception as exc:
        cause = exc.message if isinstance(exc, EZTinkerError) else f"{type(exc).__name__}: {exc}"
        rt.store.update_run(run_id, status="failed", error=cause)
        raise
    rt.store.put_model(rt.engine.model_info(info.base_model).to_dict())
    rt.store.update_run(
        run_id,
        status=status,
        error=None,
        base_model=info.base_model,
        lora=info.lora.to_dict(),
        step=info.step,
        tokens_trained=info.tokens_trained,  # a run made from a state starts where it was
        last_loss=info.last_loss,
        last_state=from_checkpoint,
    )
    report_now()
    return info.to_dict()


def _apply(rt: WorkerRuntime, run_id: str, op: LoggedOp, answered: bool) -> Any:
    """Apply one logged op to the run; its result (a dict) or its error."""
    k = op.kwargs
    try:
        if op.task == names.CREATE_RUN:
            lora = k.get("lora")
            if answered:  # re-create it exactly: with the seed its creation recorded
                record = rt.store.get_run(run_id)
                lora = record.lora if record is not None else lora
            return create_run_now(
                rt,
                run_id,
                k.get("base_model"),
                lora,
                k.get("from_checkpoint"),
                bool(k.get("optimizer", True)),
                status="recovering",  # ready once every logged op is applied again
            )
        if op.task in (names.FORWARD_BACKWARD, names.FORWARD):
            data = [Datum.from_dict(d) for d in k["data"]]
            call = CallSpec(
                run_id,
                data,
                k.get("loss_fn", "cross_entropy"),
                k.get("loss_fn_config"),
                op.task == names.FORWARD_BACKWARD,
            )
            out = rt.engine.run_calls([call])[0]
            return out if isinstance(out, EZTinkerError) else out.to_dict()
        if op.task == names.OPTIM_STEP:
            return rt.engine.optim_step(run_id, AdamParams.from_dict(k["adam"])).to_dict()
        if op.task == names.LOAD:
            info = rt.engine.load_state(run_id, k["path"], bool(k.get("optimizer", True)))
            rt.store.update_run(run_id, last_state=k["path"])
            return info.to_dict()
        if op.task == names.SAVE:
            if k.get("kind", "state") == "sampler":
                return rt.engine.save_weights_for_sampler(run_id, k["name"]).to_dict()
            saved = rt.engine.save_state(run_id, k["name"])
            rt.store.update_run(run_id, last_state=saved.path)
            return saved.to_dict()
        return InternalError(f"operation {op.task} cannot be replayed")
    except EZTinkerError as exc:
        return exc
    except Exception as exc:
        log.exception("replaying op %d (%s) of run %s failed", op.seq_id, op.task, run_id)
        return InternalError(f"{type(exc).__name__}: {exc}")


def _statuses(rt: WorkerRuntime, backend: ResultBackend, ops: list[LoggedOp]) -> list[str]:
    """Each op's stored result status (SUCCESS / FAILURE / "" if it has none)."""
    if not ops:
        return []
    raws = rt.store.r.mget([backend.get_key_for_task(op.future_id) for op in ops])
    return [json.loads(raw).get("status", "") if raw else "" for raw in raws]


def _running_at_crash(rt: WorkerRuntime, ops: list[LoggedOp], statuses: list[str]) -> int | None:
    """The seq_id of the unanswered op that had started (it was running when its worker died)."""
    unanswered = [op for op, status in zip(ops, statuses, strict=True) if not status]
    if not unanswered:
        return None
    marks = rt.store.r.mget([rt.store.future_key(op.future_id) + ":started" for op in unanswered])
    for op, mark in zip(unanswered, marks, strict=True):
        if mark:
            return op.seq_id
    return None


def _answer(
    rt: WorkerRuntime, backend: ResultBackend, run_id: str, op: LoggedOp, outcome: Any, at: float
) -> None:
    """Store ``outcome`` as op's result (marking it applied) and take its message off the queue."""
    if isinstance(outcome, EZTinkerError):
        key, value = backend.failure_record(op.future_id, OperationFailed.wrap(outcome))
        seq = None
    else:
        rt.applied(run_id, op.seq_id)
        key, value = backend.result_record(op.future_id, outcome)
        seq = op.seq_id
    ttl = int(rt.settings.result_ttl_s)
    started = json.dumps({"at": at, "worker": rt.worker_name, "recovered": True})
    stats: dict[str, Any] = {}
    if rt.engine.has_run(run_id):
        info = rt.engine.run_info(run_id)
        stats = {"step": info.step, "tokens_trained": info.tokens_trained}
        stats["last_loss"] = info.last_loss
    with rt.store.r.pipeline(transaction=True) as pipe:
        rt.store.answer_call(run_id, seq, op.future_id, key, value, ttl, pipe)
        rt.store.finish_op(run_id, None, "", pipe, **stats)
        if seq is not None:  # its first answer: its metrics point (``metrics_history``)
            record_point(pipe, run_id, op.task, seq, outcome, stats.get("step"))
        pipe.set(rt.store.future_key(op.future_id) + ":started", started, ex=ttl)
        pipe.lrem(names.run_queue(run_id), 1, op.raw)  # ty: ignore[no-matching-overload] - bytes work
        pipe.execute()


def recover(
    rt: WorkerRuntime, backend: ResultBackend, run_id: str, upto: int | None = None
) -> Recovered:
    """Rebuild ``run_id`` on this worker from its snapshot and logged ops (module docstring).

    ``upto``: replay only ops with a seq_id up to it (the op that asked for the recovery runs
    next, as usual). Returns ``Recovered(recovered=False)`` for a run that is held already or
    is not recoverable; raises RunFailed for a run whose creation failed. If the run cannot be
    rebuilt (its snapshot is gone), every unanswered logged op fails with the reason and the
    run is recorded ``lost``: no future is left waiting.
    """
    started = time.monotonic()
    if rt.engine.has_run(run_id):
        return Recovered(run_id, recovered=False)
    record = rt.store.get_run(run_id)
    if record is None or record.status == "deleted" or not record.recoverable:
        return Recovered(run_id, recovered=False)
    if record.status == "failed":
        raise RunFailed.of(run_id, record.error)
    snap = rt.oplog.snapshot(run_id)
    ops = rt.oplog.entries(run_id, snap.seq_id if snap else -1)
    if upto is not None:
        ops = [op for op in ops if op.seq_id <= upto]
    statuses = _statuses(rt, backend, ops)
    rt.store.update_run(run_id, status="recovering", error=None)
    log.info("recovering run %s from %s", run_id, snap.path if snap else "its creation")
    try:
        if snap is not None:
            rt.engine.restore_run(run_id, Path(snap.path))
        elif not ops or ops[0].task != names.CREATE_RUN:
            raise RunStateLost(f"run {run_id} has no snapshot and its creation is not logged")
    except Exception as exc:
        why = exc.message if isinstance(exc, EZTinkerError) else f"{type(exc).__name__}: {exc}"
        lost = RunStateLost(f"run {run_id} could not be recovered: {why}")
        for op, status in zip(ops, statuses, strict=True):
            if not status:
                _answer(rt, backend, run_id, op, lost, time.time())
        rt.store.update_run(run_id, status="lost", error=lost.message)
        raise lost from exc
    crashed = _running_at_crash(rt, ops, statuses)
    done = Recovered(run_id, True, snap.seq_id if snap else None)
    for op, status in zip(ops, statuses, strict=True):
        if status == "FAILURE":  # failed (or given up by the web): it must never run now
            rt.store.r.lrem(names.run_queue(run_id), 1, op.raw)  # ty: ignore[no-matching-overload]
            continue
        if status == "SUCCESS" and op.task not in STATEFUL:
            continue
        if status == "SUCCESS":
            outcome = _apply(rt, run_id, op, answered=True)
            if isinstance(outcome, EZTinkerError):  # it succeeded once: the state is off now
                log.error("replaying op %d of run %s failed: %s", op.seq_id, run_id, outcome)
            else:
                rt.applied(run_id, op.seq_id)
            done.replayed.append(op.seq_id)
            continue
        at = time.time()
        if op.seq_id == crashed and rt.oplog.count_crash(run_id, op.seq_id) >= 2:
            outcome: Any = OperationCrashed(
                f"operation {op.seq_id} ({op.task.removeprefix('eztinker.')}) of run {run_id} "
                "was running twice when its worker died; it is not run a third time (the run "
                "itself is recovered: its other operations go on)"
            )
        else:
            if op.seq_id == crashed:
                rt.oplog.count_crash(run_id, op.seq_id)  # counted before it runs again
            outcome = _apply(rt, run_id, op, answered=False)
        _answer(rt, backend, run_id, op, outcome, at)
        (done.failed if isinstance(outcome, EZTinkerError) else done.answered).append(op.seq_id)
    info = rt.engine.run_info(run_id) if rt.engine.has_run(run_id) else None
    if info is not None:
        rt.store.update_run(
            run_id,
            status="ready",
            error=None,
            step=info.step,
            tokens_trained=info.tokens_trained,
            last_loss=info.last_loss,
        )
        applied = {*done.replayed, *done.answered}
        last = max((op for op in ops if op.seq_id in applied), default=None, key=_seq)
        if last is not None:
            rt.snapshots.after_op(run_id, last.seq_id, last.future_id, force=True)
    rt.oplog.adopted(run_id)
    report_now()
    result = Recovered(
        run_id,
        info is not None,
        done.from_seq_id,
        done.replayed,
        done.answered,
        done.failed,
        round(time.monotonic() - started, 3),
    )
    log.info(
        "recovered run %s in %.2f s: %d ops replayed, %d answered, %d failed",
        run_id,
        result.seconds,
        len(result.replayed),
        len(result.answered),
        len(result.failed),
    )
    return result


def _seq(op: LoggedOp) -> int:
    return op.seq_id


def unanswered(rt: WorkerRuntime, backend: ResultBackend, run_id: str) -> int:
    """How many of the run's logged ops after its snapshot have no result yet."""
    snap = rt.oplog.snapshot(run_id)
    ops = rt.oplog.entries(run_id, snap.seq_id if snap else -1)
    return sum(1 for status in _statuses(rt, backend, ops) if not status)


def request_recovery(app: Celery, worker: str, run_ids: list[str]) -> None:
    """Queue a ``recover_run`` for each run, in this order, on ``worker``'s own queue.

    (A run whose queued op reaches the worker first is recovered right then, by that op.)
    """
    queue = names.worker_queue(worker)
    client = app.backend.client
    for run_id in run_ids:
        task_id = f"recover_{run_id}_{time.time_ns()}"
        message = messages.task_message(app, names.RECOVER_RUN, task_id, {"run_id": run_id}, queue)
        client.lpush(queue, message.payload)  # kombu pops the oldest from the right


def adopt_orphans(app: Celery, rt: WorkerRuntime) -> list[str]:
    """Adopt the recoverable runs whose worker has been gone ``rehome_after_s``; their ids.

    A worker that is starting again (its launch recorded, not yet live) keeps its runs. A live
    worker that already holds a run on the orphan's base (its weights loaded) gets the first
    chance: the others wait two heartbeats more.
    """
    settings = rt.settings
    if not settings.recovery:
        return []
    store = rt.store
    live = store.live_workers()
    alive = {w.name for w in live} | {s.name for s in store.starting_workers()}
    runs = store.list_runs()
    base_of = {r.run_id: r.base_model for r in runs}
    bases = {w.name: {base_of.get(run_id) for run_id in w.runs} for w in live}
    adopted = []
    for record in runs:
        if not record.recoverable or record.worker in alive or record.status in ("failed",):
            continue
        wait = settings.rehome_after_s
        base = record.base_model
        if base not in bases.get(rt.worker_name, set()) and any(base in b for b in bases.values()):
            wait += 2 * settings.worker_heartbeat_s
        if time.time() - rt.oplog.orphaned_since(record.run_id) < wait:
            continue
        _, moved = store.move_run(record.run_id, record.worker, rt.worker_name)
        if not moved:
            continue
        app.control.add_consumer(
            names.run_queue(record.run_id), destination=[rt.worker_name], reply=False
        )
        store.update_run(
            record.run_id,
            status="recovering",
            error=f"worker {record.worker} is gone; {rt.worker_name} is recovering the run",
        )
        request_recovery(app, rt.worker_name, [record.run_id])
        log.warning(
            "adopted run %s of worker %s (gone for over %.0f s)",
            record.run_id,
            record.worker,
            settings.rehome_after_s,
        )
        adopted.append(record.run_id)
    return adopted
