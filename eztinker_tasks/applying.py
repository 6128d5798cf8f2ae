"""Applying one operation on a worker: at most once per ``seq_id``, in order, on the worker
that owns the run (the machinery under every task in ``eztinker_tasks.tasks``).

- ``_call`` makes the operation's start-up round trip (``prefetch``: mark it started, check
  whether its seq_id was applied, peek at the queue, read the run's owner) and runs it;
- ``_run_op`` answers a redelivered or resent op from its stored result, refuses one that
  would run out of order (``stale_operation``), hands an op of a run that moved to another
  worker back to it (fencing, ``_hand_over``), rebuilds a run whose worker died from its
  snapshot and op log (``eztinker_tasks.recovery``) or says why it cannot, and records the
  op as applied with the run's new counters in the transaction that stores its result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from config import Settings
from eztinker_tasks import messages, names, recovery
from eztinker_tasks.errors import (
    EZTinkerError,
    RunFailed,
    RunStateLost,
    StaleOperation,
    UnknownRun,
)
from eztinker_tasks.metrics_history import record_point
from eztinker_tasks.prefetch import BeginSpec
from eztinker_tasks.result_backend import ResultBackend
from eztinker_tasks.runtime import WorkerRuntime, get_runtime, report_now
from eztinker_tasks.store_worker import Begun

log = logging.getLogger(__name__)


COALESCED = frozenset({names.FORWARD, names.FORWARD_BACKWARD})


def coalesce_peek(settings: Settings, seq_id: int | None) -> int:
    """How many queued calls a forward(_backward) looks at to run in the same pass."""
    return settings.coalesce_max_ops - 1 if seq_id is not None else 0


def expected_begin(
    name: str, task_id: str, kwargs: Mapping[str, Any], settings: Settings
) -> BeginSpec:
    """The ``BeginSpec`` a task will ask, as its message tells it (for the prefetch)."""
    run_id, seq_id = kwargs.get("run_id"), kwargs.get("seq_id")
    if not isinstance(run_id, str) or not isinstance(seq_id, int):
        return BeginSpec(task_id)
    peek = coalesce_peek(settings, seq_id) if name in COALESCED else 0
    return BeginSpec.of(task_id, run_id, seq_id, peek)


def _call(
    task: Task,
    op: Callable[[WorkerRuntime, Begun], dict[str, Any]],
    run_id: str | None = None,
    seq_id: int | None = None,
    peek: int = 0,
) -> dict[str, Any]:
    """Run ``op`` with the worker runtime (failures are reported by ``OperationTask``)."""
    rt = get_runtime(task.app)
    spec = BeginSpec.of(str(task.request.id), run_id, seq_id, peek)
    return op(rt, rt.prefetch.begin(spec, rt.worker_name))


def _run_op(
    task: Task,
    run_id: str,
    seq_id: int | None,
    op: Callable[[WorkerRuntime, Begun], dict[str, Any]],
    *,
    needs_live_run: bool = True,
    peek: int = 0,
) -> dict[str, Any]:
    """Apply one operation of a run at most once per ``seq_id``."""

    def body(rt: WorkerRuntime, begun: Begun) -> dict[str, Any]:
        if begun.owner is not None and begun.owner != rt.worker_name:
            _hand_over(task, rt, run_id, begun.owner)
        prior = begun.prior
        latest = rt.applied_seq.get(run_id, 0)
        if prior is None and seq_id is not None and seq_id <= latest:
            # Not applied when the message arrived; an op committed since may have applied
            # it (a message fetched again after a broker reconnect): ask now.
            prior = rt.store.applied_future(run_id, seq_id)
        if prior is not None:
            # Redelivered or resent: never apply twice; answer with the first result.
            meta = task.app.backend.get_task_meta(prior)
            if meta.get("status") == "SUCCESS":
                return meta["result"]
            return {"duplicate": True, "seq_id": seq_id}
        if seq_id is not None and seq_id <= latest:
            # Applied ops answered above; this one comes after a later one ran (or its own
            # application's record was lost): never apply it out of order, or twice.
            why = (
                f"it arrived after operation {latest} was applied (it was redelivered late: "
                "its worker died while running it)"
                if seq_id < latest
                else "it was applied already, but the record of that was lost"
            )
            raise StaleOperation(
                f"operation {seq_id} of run {run_id} was not applied: {why}; a run applies "
                "its operations once each, in seq_id order"
            )
        if needs_live_run and not rt.engine.has_run(run_id):
            # Its worker died or restarted: rebuild it from its snapshot and logged ops (up
            # to this one, which runs next as usual), if it is recoverable.
            upto = None if seq_id is None else seq_id - 1
            recovery.recover(rt, task.app.backend, run_id, upto=upto)
            if not rt.engine.has_run(run_id):
                raise _not_held(rt, run_id)
            if task.app.backend.get_task_meta(str(task.request.id)).get("status") == "FAILURE":
                raise Ignore()  # given up while no worker held the run: it must not run now
        result = op(rt, begun)
        rt.applied(run_id, seq_id)
        stats: dict[str, Any] = {}
        if rt.engine.has_run(run_id):
            info = rt.engine.run_info(run_id)
            stats = {
                "step": info.step,
                "tokens_trained": info.tokens_trained,
                "last_loss": info.last_loss,
                "status": "ready",
                "error": None,  # healthy: an earlier error (state lost, ...) is history
            }
        # Recorded in the same transaction that stores (and publishes) the result, with the
        # op's metrics point (``metrics_history``).
        task_id = str(task.request.id)
        backend: ResultBackend = task.app.backend
        step = stats.get("step")

        def writes(pipe: Any) -> None:
            rt.store.finish_op(run_id, seq_id, task_id, pipe, **stats)
            record_point(pipe, run_id, str(task.name), seq_id, result, step)

        backend.write_with_result(task_id, writes)
        return result

    return _call(task, body, run_id, seq_id, peek)


def _hand_over(task: Task, rt: WorkerRuntime, run_id: str, owner: str) -> None:
    """The run moved to ``owner`` (this worker was taken for dead: stopped, or cut off, for
    longer than ``EZTINKER_REHOME_AFTER_S``): drop its stale state here, stop serving its
    queue and put the message back at the head of the queue, where the owner takes it next
    (the ops behind it stay behind it). Raises celery's ``Ignore``: no result from here."""
    log.warning("run %s now belongs to %s: handing its operation over", run_id, owner)
    if rt.engine.has_run(run_id):
        rt.engine.delete_run(run_id)
    rt.applied_seq.pop(run_id, None)
    rt.snapshots.forget(run_id)
    queue = names.run_queue(run_id)
    task.app.control.cancel_consumer(queue, destination=[rt.worker_name], reply=False)
    kwargs = dict(task.request.kwargs or {})
    message = messages.task_message(task.app, str(task.name), str(task.request.id), kwargs, queue)
    rt.store.r.rpush(queue, message.payload)  # kombu pops the oldest from the right
    report_now()
    raise Ignore()


def _not_held(rt: WorkerRuntime, run_id: str) -> EZTinkerError:
    """Why this worker does not hold ``run_id``: gone, never created, or its state was lost."""
    record = rt.store.get_run(run_id)
    if record is None or record.status == "deleted":
        return UnknownRun(f"unknown run {run_id!r}")
    if record.status == "failed":
        return RunFailed.of(run_id, record.error)
    hint = (
        f"load its last saved state ({record.last_state}) to resume"
        if record.last_state
        else "it has no saved state; create a new run"
    )
    return RunStateLost(
        f"run {run_id} lost its in-memory state (its worker {rt.worker_name} restarted); " + hint
    )
