"""Thin Celery tasks: unpack ids and parameters, call the engine, return JSON.

Every task body is a few lines over ``eztinker_tasks.engine.Engine``. A task raises what its
operation raises; the tasks' base class (``eztinker_tasks.task_base``) turns it into
``OperationFailed`` carrying the error envelope (``category`` user/server), so the future
reports it, and logs it once as its kind deserves. Run operations carry a ``seq_id``: an
operation already applied (a redelivered message) is not applied again; its stored result is
returned instead.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from eztinker_tasks import cycle, names, recovery
from eztinker_tasks.applying import _call, _run_op, coalesce_peek
from eztinker_tasks.errors import EZTinkerError, RunFailed
from eztinker_tasks.metrics_history import forget_points
from eztinker_tasks.result_backend import ResultBackend
from eztinker_tasks.runtime import WorkerRuntime, get_runtime, report_now
from eztinker_tasks.sample_batch import SampleRequest
from eztinker_tasks.sampling import sample_body
from eztinker_tasks.snapshots import remove_snapshots
from eztinker_tasks.store_worker import Begun
from eztinker_tasks.types import (
    AdamParams,
    CallSpec,
    Datum,
    SampleSource,
    SamplingParams,
)

log = logging.getLogger(__name__)


@shared_task(name=names.CREATE_RUN, bind=True)
def create_run(
    self: Task,
    run_id: str,
    base_model: str | None = None,
    lora: dict[str, Any] | None = None,
    from_checkpoint: str | None = None,
    optimizer: bool = True,
) -> dict[str, Any]:
    def op(rt: WorkerRuntime, _: Begun) -> dict[str, Any]:
        out = recovery.create_run_now(rt, run_id, base_model, lora, from_checkpoint, optimizer)
        rt.snapshots.after_op(run_id, 0, str(self.request.id), force=True)
        return out

    return _call(self, op)


def _loss_op(
    task: Task,
    run_id: str,
    seq_id: int | None,
    data: list[dict[str, Any]],
    loss_fn: str,
    loss_fn_config: dict[str, float] | None,
    *,
    backward: bool,
) -> dict[str, Any]:
    """forward_backward / forward, in one pass with the calls queued behind it (its run's
    and, on the same base, the worker's other runs': ``eztinker_tasks.cycle``)."""
    lead = CallSpec(run_id, [Datum.from_dict(d) for d in data], loss_fn, loss_fn_config, backward)

    def op(rt: WorkerRuntime, begun: Begun) -> dict[str, Any]:
        started_at = cycle.now()
        gathered = cycle.Gathered([], [])
        if seq_id is not None:
            tokens = sum(len(d.tokens) for d in lead.data)
            gathered = cycle.gather(rt, str(task.name), run_id, seq_id, tokens, begun.queued)
        others = gathered.calls
        specs = [lead, *(cycle.call_spec(o, backward) for o in others)]
        # The calls that join this pass show its progress too.
        with rt.progress.track([str(task.request.id), *(o.task_id for o in others)]) as report:
            outcomes = rt.engine.run_calls(specs, progress=report)
        answered = list(zip(others, outcomes[1:], strict=True))
        backend: ResultBackend = task.app.backend
        if isinstance(outcomes[0], EZTinkerError):
            _store_now(task, rt, started_at, answered)  # they stand on their own
            raise outcomes[0]
        if answered:
            writes = cycle.answer(
                rt, backend, str(task.request.id), started_at, answered, str(task.name)
            )
            backend.write_with_result(str(task.request.id), writes)
            log.info(
                "ran %d queued calls (%d of other runs) in the pass of run %s",
                len(answered),
                len(gathered.companions),
                run_id,
            )
        return outcomes[0].to_dict()

    peek = coalesce_peek(get_runtime(task.app).settings, seq_id)
    return _run_op(task, run_id, seq_id, op, peek=peek)


@shared_task(name=names.FORWARD_BACKWARD, bind=True)
def forward_backward(
    self: Task,
    run_id: str,
    seq_id: int,
    data: list[dict[str, Any]],
    loss_fn: str = "cross_entropy",
    loss_fn_config: dict[str, float] | None = None,
) -> dict[str, Any]:
    return _loss_op(self, run_id, seq_id, data, loss_fn, loss_fn_config, backward=True)


@shared_task(name=names.FORWARD, bind=True)
def forward(
    self: Task,
    run_id: str,
    seq_id: int | None,
    data: list[dict[str, Any]],
    loss_fn: str = "cross_entropy",
    loss_fn_config: dict[str, float] | None = None,
) -> dict[str, Any]:
    return _loss_op(self, run_id, seq_id, data, loss_fn, loss_fn_config, backward=False)


@shared_task(name=names.OPTIM_STEP, bind=True)
def optim_step(self: Task, run_id: str, seq_id: int, adam: dict[str, float]) -> dict[str, Any]:
    """One AdamW step; the optim_steps at the heads of the worker's other runs' queues on the
    same base are applied in the same operation and answered with it (``cycle``)."""
    params = AdamParams.from_dict(adam)

    def op(rt: WorkerRuntime, _: Begun) -> dict[str, Any]:
        started_at = cycle.now()
        others = cycle.gather_optim_steps(rt, run_id) if seq_id is not None else []
        try:
            out = rt.engine.optim_step(run_id, params).to_dict()
        except EZTinkerError:
            _store_now(self, rt, started_at, cycle.optim_steps(rt, others))
            raise
        answered = cycle.optim_steps(rt, others)
        if answered:
            writes = cycle.answer(
                rt, self.app.backend, str(self.request.id), started_at, answered, names.OPTIM_STEP
            )
            self.app.backend.write_with_result(str(self.request.id), writes)
        # An optim_step boundary: snapshot the runs that are due (off this thread).
        rt.snapshots.after_op(run_id, seq_id, str(self.request.id))
        for queued, outcome in answered:
            if not isinstance(outcome, EZTinkerError):
                rt.snapshots.after_op(queued.run_id, queued.seq_id, queued.task_id)
        return out

    return _run_op(self, run_id, seq_id, op)


def _store_now(task: Task, rt: WorkerRuntime, started_at: float, answered: list) -> None:
    """Store answered calls at once (the starting call failed, so nothing rides on its result)."""
    if not answered:
        return
    backend: ResultBackend = task.app.backend
    writes = cycle.answer(rt, backend, str(task.request.id), started_at, answered, str(task.name))
    with backend.client.pipeline(transaction=True) as pipe:
        writes(pipe)
        pipe.execute()


@shared_task(name=names.SAVE, bind=True)
def save(self: Task, run_id: str, seq_id: int, name: str, kind: str = "state") -> dict[str, Any]:
    def op(rt: WorkerRuntime, _: Begun) -> dict[str, Any]:
        if kind == "sampler":
            info = rt.engine.save_weights_for_sampler(run_id, name)
        else:
            info = rt.engine.save_state(run_id, name)
            rt.store.update_run(run_id, last_state=info.path)
        return info.to_dict()

    return _run_op(self, run_id, seq_id, op)


@shared_task(name=names.LOAD, bind=True)
def load(self: Task, run_id: str, seq_id: int, path: str, optimizer: bool = True) -> dict[str, Any]:
    def op(rt: WorkerRuntime, _: Begun) -> dict[str, Any]:
        if rt.engine.has_run(run_id):
            info = rt.engine.load_state(run_id, path, optimizer)
        else:  # the worker restarted, or the run moved here: rebuild it from the checkpoint
            record = rt.store.get_run(run_id)
            if record is not None and record.status == "failed":
                raise RunFailed.of(run_id, record.error)
            info = rt.engine.create_run_from_checkpoint(run_id, path, optimizer)
            report_now()
        rt.store.update_run(run_id, last_state=path, status="ready", error=None)
        rt.snapshots.after_op(run_id, seq_id, str(self.request.id), force=True)
        return info.to_dict()

    return _run_op(self, run_id, seq_id, op, needs_live_run=False)


@shared_task(name=names.SAMPLE, bind=True)
def sample(
    self: Task,
    source: dict[str, Any],
    num_samples: int,
    params: dict[str, Any],
    prompt_tokens: list[int] | None = None,
    prompt_text: str | None = None,
    prompt_logprobs: bool = False,
    stream: bool = False,
) -> dict[str, Any]:
    src = SampleSource.from_dict(source)
    lead = SampleRequest(
        task_id=str(self.request.id),
        source=src,
        num_samples=num_samples,
        params=SamplingParams.from_dict(params),
        prompt_tokens=prompt_tokens,
        prompt_text=prompt_text,
        prompt_logprobs=prompt_logprobs,
        stream=stream,
    )

    def op(rt: WorkerRuntime) -> dict[str, Any]:
        return sample_body(rt, self.app.backend, lead)

    if src.run_id:
        return _run_op(self, src.run_id, None, lambda rt, _: op(rt))
    return _call(self, lambda rt, _: op(rt))


@shared_task(name=names.COMPUTE_LOGPROBS, bind=True)
def compute_logprobs(self: Task, source: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    src = SampleSource.from_dict(source)

    def op(rt: WorkerRuntime) -> dict[str, Any]:
        return {"logprobs": rt.engine.compute_logprobs(src, tokens)}

    if src.run_id:
        return _run_op(self, src.run_id, None, lambda rt, _: op(rt))
    return _call(self, lambda rt, _: op(rt))


@shared_task(name=names.DELETE_RUN, bind=True)
def delete_run(self: Task, run_id: str) -> dict[str, Any]:
    def op(rt: WorkerRuntime, _: Begun) -> dict[str, Any]:
        held = rt.engine.has_run(run_id)
        if held:
            rt.engine.delete_run(run_id)
        rt.applied_seq.pop(run_id, None)
        rt.store.update_run(run_id, status="deleted")
        rt.snapshots.forget(run_id)
        rt.oplog.forget(run_id)
        forget_points(rt.store.r, run_id)
        remove_snapshots(rt.settings.checkpoints_dir, run_id)
        self.app.control.cancel_consumer(
            names.run_queue(run_id), destination=[rt.worker_name], reply=False
        )
        report_now()
        return {"run_id": run_id, "deleted": True, "was_loaded": held}

    return _call(self, op)


@shared_task(name=names.RECOVER_RUN, bind=True)
def recover_run(self: Task, run_id: str) -> dict[str, Any]:
    """Rebuild a recoverable run on this worker (``eztinker_tasks.recovery``)."""

    def op(rt: WorkerRuntime, _: Begun) -> dict[str, Any]:
        return recovery.recover(rt, self.app.backend, run_id).to_dict()

    return _call(self, op)
