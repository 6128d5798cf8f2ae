"""The clock cycle, without the wait: one pass for the queued calls of many runs.

When a ``forward_backward`` (or ``forward``) of run R starts on a worker, the calls waiting at
the head of R's own queue (followers) and at the heads of the queues of the worker's other runs
on the same base (companions) join it: all of them run in ONE packed engine pass
(``Engine.run_calls``), each run's calls in their order, each call with exactly the outputs and
gradient it would get alone. Nothing waits for company: a lone call runs at once, alone.

The answered calls' results (or their errors) are stored under their own futures, their
seq_ids recorded as applied and their messages removed from their queues, in the MULTI/EXEC
that stores the starting call's result (see ``coalesce`` for why removing them is safe). Each
answered future also gets a start marker naming the pass it ran in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eztinker_tasks import names
from eztinker_tasks.coalesce import QueuedOp, head_calls, head_optim_step, remove_answered
from eztinker_tasks.errors import EZTinkerError, OperationFailed
from eztinker_tasks.metrics_history import record_point
from eztinker_tasks.result_backend import ResultBackend
from eztinker_tasks.runtime import WorkerRuntime
from eztinker_tasks.store import Store
from eztinker_tasks.types import AdamParams, CallSpec, Datum, ForwardBackwardOutput, OptimStepOutput

Outcome = ForwardBackwardOutput | OptimStepOutput | EZTinkerError


@dataclass(frozen=True)
class Gathered:
    """The calls that join a starting call's pass: its run's followers, other runs' heads."""

    followers: list[QueuedOp]
    companions: list[QueuedOp]

    @property
    def calls(self) -> list[QueuedOp]:
        return [*self.followers, *self.companions]


def gather(
    rt: WorkerRuntime,
    task_name: str,
    run_id: str,
    seq_id: int,
    lead_tokens: int,
    own_head: Sequence[bytes],
) -> Gathered:
    """Read (one round trip for the other runs) the calls that can share this pass."""
    settings = rt.settings
    ops_left = settings.coalesce_max_ops - 1
    tokens_left = max(0, settings.coalesce_max_tokens - lead_tokens)

    def budget(calls: list[QueuedOp]) -> tuple[int, int]:
        return ops_left - len(calls), tokens_left - sum(c.tokens for c in calls)

    followers = head_calls(
        own_head,
        task_name,
        run_id,
        max_ops=ops_left,
        max_tokens=tokens_left,
        # A queued seq_id at or below this one or the last applied is a late redelivery.
        already_applied=lambda seq: seq <= max(seq_id, rt.applied_seq.get(run_id, 0)),
    )
    companions: list[QueuedOp] = []
    peers = rt.engine.peers(run_id) if settings.cross_run_batching else []
    ops, tokens = budget(followers)
    if peers and ops > 0 and tokens > 0:
        heads = rt.store.queue_heads([names.run_queue(p) for p in peers], settings.coalesce_max_ops)
        for peer in peers:
            ops, tokens = budget([*followers, *companions])
            if ops <= 0 or tokens <= 0:
                break
            companions += head_calls(
                heads.get(names.run_queue(peer), []),
                task_name,
                peer,
                max_ops=ops,
                max_tokens=tokens,
                already_applied=lambda seq, peer=peer: seq <= rt.applied_seq.get(peer, 0),
            )
    return Gathered(followers, companions)


def gather_optim_steps(rt: WorkerRuntime, run_id: str) -> list[QueuedOp]:
    """The optim_steps waiting at the heads of the other runs' queues on the same base.

    Run together with a starting optim_step, they cost this worker one operation instead of
    one each (each run's step is still its own AdamW update).
    """
    settings = rt.settings
    if not settings.cross_run_batching or settings.coalesce_max_ops <= 1:
        return []
    peers = rt.engine.peers(run_id)
    if not peers:
        return []
    heads = rt.store.queue_heads([names.run_queue(p) for p in peers], 1)
    steps = []
    for peer in peers:
        op = head_optim_step(
            heads.get(names.run_queue(peer), []),
            peer,
            already_applied=lambda seq, peer=peer: seq <= rt.applied_seq.get(peer, 0),
        )
        if op is not None:
            steps.append(op)
        if len(steps) >= settings.coalesce_max_ops - 1:
            break
    return steps


def optim_steps(rt: WorkerRuntime, ops: Sequence[QueuedOp]) -> list[tuple[QueuedOp, Any]]:
    """Each queued optim_step applied to its run: (op, its output or its error)."""
    out: list[tuple[QueuedOp, Any]] = []
    for op in ops:
        try:
            assert op.adam is not None
            out.append((op, rt.engine.optim_step(op.run_id, AdamParams.from_dict(op.adam))))
        except EZTinkerError as exc:
            out.append((op, exc))
    return out


def call_spec(op: QueuedOp, backward: bool) -> CallSpec:
    return CallSpec(
        op.run_id,
        [Datum.from_dict(d) for d in op.data],
        op.loss_fn,
        op.loss_fn_config,
        backward,
    )


def answer(
    rt: WorkerRuntime,
    backend: ResultBackend,
    lead_task_id: str,
    started_at: float,
    answered: Sequence[tuple[QueuedOp, Any]],
    task_name: str,
) -> Any:
    """The writes (for a pipeline) that store every answered call's result or error (and the
    metrics point of each that succeeded; ``task_name``: what the calls are, all alike)."""
    records = []
    for op, outcome in answered:
        if isinstance(outcome, EZTinkerError):
            key, value = backend.failure_record(op.task_id, OperationFailed.wrap(outcome))
        else:
            rt.applied(op.run_id, op.seq_id)
            key, value = backend.result_record(op.task_id, outcome.to_dict())
        records.append((op, outcome, key, value))
    stats = {run_id: _stats(rt, run_id) for run_id in {op.run_id for op, _ in answered}}
    started = json.dumps({"at": started_at, "worker": rt.worker_name, "pass": lead_task_id})
    ttl = int(rt.settings.result_ttl_s)

    def writes(pipe: Any) -> None:
        store: Store = rt.store
        for op, outcome, key, value in records:
            ok = not isinstance(outcome, EZTinkerError)
            store.answer_call(
                op.run_id, op.seq_id if ok else None, op.task_id, key, value, ttl, pipe
            )
            if ok:
                step = stats[op.run_id].get("step")
                record_point(pipe, op.run_id, task_name, op.seq_id, outcome.to_dict(), step)
            pipe.set(store.future_key(op.task_id) + ":started", started, ex=ttl)
        for run_id, run_stats in stats.items():
            if run_stats:
                store.finish_op(run_id, None, "", pipe, **run_stats)
        by_queue: dict[str, list[QueuedOp]] = {}
        for op, _ in answered:
            by_queue.setdefault(names.run_queue(op.run_id), []).append(op)
        for queue, ops in by_queue.items():
            remove_answered(pipe, queue, ops)

    return writes


def _stats(rt: WorkerRuntime, run_id: str) -> dict[str, Any]:
    if not rt.engine.has_run(run_id):
        return {}
    info = rt.engine.run_info(run_id)
    return {
        "step": info.step,
        "tokens_trained": info.tokens_trained,
        "last_loss": info.last_loss,
        "status": "ready",
    }


def now() -> float:
    return time.time()
