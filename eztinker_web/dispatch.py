"""Turning a validated request into a Celery message on the right queue, exactly once.

Run operations go to the run's own queue with a per-run ``seq_id``. A submit that reuses a
seq_id with the same body returns the original future (safe client retries); with another body
it is a 409. Every issued future id is recorded, so unknown ids answer 404.

A run lives on one worker; if that worker is gone, ``rehome`` moves the run's queue to a live
worker (for ``load``, which rebuilds the run there from a saved state).

Runs and futures are recorded with the caller's tenant; a run of another tenant is unknown
(``tenancy``), and what a submit adds is counted against the tenant's limits (``quota``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eztinker_tasks import catalog, messages, model_sizes, names
from eztinker_tasks.errors import InvalidRequest, RunFailed, ServiceUnavailable, UnknownRun
from eztinker_tasks.store import FutureRecord, QueuedMessage, RunRecord, WorkerRecord, body_hash
from eztinker_web import quota, tenancy
from eztinker_web.auth import caller
from eztinker_web.health.workers import no_live_worker
from eztinker_web.services import services
from eztinker_web.targets import RunTarget


@dataclass(frozen=True)
class Submitted:
    future_id: str
    seq_id: int | None
    run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "future_id": self.future_id,
            "job_id": self.future_id,
            "seq_id": self.seq_id,
            "run_id": self.run_id,
        }


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def live_run(run_id: str) -> RunRecord:
    """The run's record; UnknownRun (404) if it never existed, was deleted or is another
    tenant's."""
    record = tenancy.seen_run(services().store.get_run(run_id), run_id)
    if record.status == "deleted":
        raise tenancy.unknown_run(run_id)
    return record


def usable_run(run_id: str) -> RunRecord:
    """``live_run``, and RunFailed (409, user) if its creation failed: it can run nothing."""
    record = live_run(run_id)
    if record.status == "failed":
        raise RunFailed.of(run_id, record.error)
    return record


def run_target(run_id: str) -> RunTarget:
    """The run's target, cached per process once its base model is known.

    A cached target says nothing about whether the run still exists: the submit script checks
    that, in the same round trip that queues the operation. Its tenant never changes, so a
    cached target is checked against the caller here.
    """
    svc = services()
    target = svc.run_targets.get(run_id)
    if target is None:
        record = usable_run(run_id)
        target = RunTarget(record.run_id, record.base_model, record.tenant)
        if target.base_model:
            svc.run_targets.put(run_id, target)
    tenancy.check_run_owner(run_id, target.tenant)
    return target


def model_limits(base_model: str) -> tuple[int, int] | None:
    """(vocab_size, max_context) of a model if known without loading it."""
    spec = catalog.BUILTIN_MODELS.get(base_model)
    if spec is not None:
        return int(spec.vocab_size), int(spec.max_context)
    info = services().store.get_model(base_model)
    if info is not None:
        return int(info["vocab_size"]), int(info["max_context"])
    return None


def check_tokens(
    base_model: str, sequences: Sequence[Sequence[int]], field: str, extra: int = 0
) -> None:
    """Reject token ids outside the vocabulary and sequences over the context length."""
    limits = model_limits(base_model)
    if limits is None:
        return  # unknown until a worker loads it: the engine validates
    vocab, context = limits
    for i, seq in enumerate(sequences):
        bad = [t for t in seq if t < 0 or t >= vocab]
        if bad:
            raise InvalidRequest(
                f"{field}[{i}] holds token id {bad[0]} outside the vocabulary of "
                f"{base_model} (0..{vocab - 1})",
                errors={field: {str(i): [f"token id out of range: {bad[0]}"]}},
            )
        if len(seq) + extra > context:
            raise InvalidRequest(
                f"{field}[{i}] needs {len(seq) + extra} positions; {base_model} has a context "
                f"of {context}",
                errors={field: {str(i): ["longer than the model context"]}},
            )


FIT_SHARE = 0.85  # of a worker's total device memory a base's weights may take


def _capacity(worker: WorkerRecord) -> int | None:
    """Bytes of device memory over all of a worker's GPUs (None: it does not say)."""
    per_device = worker.memory.get("device_total_bytes")
    if not per_device:
        return None
    return per_device * max(1, worker.memory.get("ranks", 1))


def pick_worker(
    workers: Sequence[WorkerRecord], min_free_bytes: int, base_model: str | None = None
) -> WorkerRecord:
    """The live worker with the fewest runs among those with enough free memory.

    A base of known size (``model_sizes.weight_bytes``: ``shaped:`` bases, local directories
    and cached hub models) goes only to workers
    whose devices together can hold it (``FIT_SHARE``), one-device workers first when one
    can; ServiceUnavailable says what to start when none can.
    """
    if not workers:
        raise ServiceUnavailable(no_live_worker(services().store))
    roomy = [w for w in workers if w.memory.get("free_bytes", min_free_bytes) >= min_free_bytes]
    if not roomy:
        raise ServiceUnavailable(
            f"every live worker has less than {min_free_bytes >> 20} MiB free; delete runs or "
            "start another worker",
        )
    needed = model_sizes.weight_bytes(base_model) if base_model else None
    if needed is not None:
        fitting = [w for w in roomy if (_capacity(w) or needed / FIT_SHARE) * FIT_SHARE >= needed]
        if not fitting:
            raise ServiceUnavailable(too_large(base_model or "", needed, roomy))
        roomy = fitting
    # A base one GPU holds leaves the multi-GPU workers to the bases that need them.
    single_first = needed is not None and any(w.memory.get("ranks", 1) == 1 for w in roomy)

    def order(w: WorkerRecord) -> tuple[bool, int, int, str]:
        multi = single_first and w.memory.get("ranks", 1) > 1
        return multi, len(w.runs), -w.memory.get("free_bytes", 0), w.name

    return min(roomy, key=order)


def too_large(base_model: str, needed: int, workers: Sequence[WorkerRecord]) -> str:
    """Why no live worker can hold ``base_model``, and what worker to start."""
    largest = max(workers, key=lambda w: _capacity(w) or 0)
    per_device = largest.memory.get("device_total_bytes", 0)
    gib = 1 << 30
    text = (
        f"base {base_model!r} needs {needed / gib:.0f} GiB for its weights (bf16); no live "
        f"worker can hold it (the largest, {largest.name}, has "
        f"{(_capacity(largest) or 0) / gib:.0f} GiB over {largest.memory.get('ranks', 1)} "
        "device(s))."
    )
    if per_device and largest.device.startswith("cuda"):
        k = max(2, -(-needed // int(per_device * FIT_SHARE)))
        ids = ",".join(str(i) for i in range(k))
        text += (
            f" Start a multi-GPU worker over {k} GPUs of {per_device / gib:.0f} GiB: "
            f"`eztinker worker --gpus {ids}` (or `eztinker server --gpus-per-worker {k}`)."
        )
    else:
        text += (
            " Start a multi-GPU worker on a host with enough GPUs: `eztinker worker --gpus 0,1` "
            "(K GPUs whose memory together exceeds the weights by ~20%)."
        )
    return text


def create_run(
    base_model: str | None, lora: Mapping[str, Any], from_checkpoint: str | None, optimizer: bool
) -> tuple[RunRecord, Submitted]:
    """Pick a worker, bind the run's queue to it alone, and send the create operation.

    The run is the caller's tenant's; TooManyRuns (429) if the tenant is at its run limit.
    """
    svc = services()
    store = svc.store
    worker = pick_worker(store.live_workers(), svc.settings.min_free_bytes, base_model)
    run_id = new_id("run_")
    queue = names.run_queue(run_id)
    tenant = caller().tenant
    record = RunRecord(
        run_id=run_id,
        base_model=base_model or "",
        lora=dict(lora),
        worker=worker.name,
        created_at=time.time(),
        recoverable=svc.settings.recovery,
        tenant=tenant,
    )
    quota.within_run_limit(lambda limit: store.put_run(record, limit))
    if not bind_queue(queue, worker.name):
        store.update_run(run_id, status="failed", error="worker did not answer")
        raise ServiceUnavailable(
            f"worker {worker.name} did not confirm binding the run's queue; is it running?"
        )
    kwargs = {
        "run_id": run_id,
        "base_model": base_model,
        "lora": dict(lora),
        "from_checkpoint": from_checkpoint,
        "optimizer": optimizer,
    }
    future_id = new_id("fut_")
    future = FutureRecord(
        future_id=future_id,
        op=names.CREATE_RUN,
        queue=queue,
        submitted_at=time.time(),
        run_id=run_id,
        seq_id=0,
        worker=worker.name,
        tenant=tenant,
    )
    message = _message(names.CREATE_RUN, kwargs, future_id, queue)
    store.queue_op(future, message, log=record.recoverable)
    return record, Submitted(future_id, 0, run_id)


def bind_queue(queue: str, worker: str, timeout_s: float = 5.0) -> bool:
    """Have ``worker`` consume ``queue``; whether it confirmed within ``timeout_s``.

    The broadcast gets a broker connection of its own. On one from the app's pool (10
    connections) it would hold that one while it waits for a second one to publish with: ten
    run creations at once then each held one and waited for another, forever, and so did
    every request after them (the web process hung; ``tests/integration/test_load.py``).
    """
    celery = services().celery
    with celery.connection_for_write() as connection:
        replies = celery.control.add_consumer(
            queue, destination=[worker], reply=True, timeout=timeout_s, connection=connection
        )
    return bool(replies)


def worker_alive(name: str) -> bool:
    return services().store.worker(name) is not None


def rehome(run_id: str) -> RunRecord:
    """Make sure a live worker serves the run's queue; move the run there if its worker is gone.

    The run's record names the new worker (compare-and-set: of concurrent requests one moves
    it, the others follow that move) and its queue is bound to that worker alone. The run's
    in-memory state is not moved: the operation sent next (``load``) rebuilds it there.
    Raises ServiceUnavailable if no live worker has room, or the new one does not answer.
    """
    svc = services()
    store = svc.store
    record = usable_run(run_id)
    if worker_alive(record.worker):
        return record
    gone = record.worker
    new = pick_worker(store.live_workers(), svc.settings.min_free_bytes, record.base_model)
    record, moved = store.move_run(run_id, gone, new.name)
    svc.run_targets.drop(run_id)
    if not moved:
        return record  # another request moved it first (and bound its queue)
    if not bind_queue(names.run_queue(run_id), new.name):
        store.move_run(run_id, new.name, gone)
        raise ServiceUnavailable(
            f"worker {new.name} did not confirm taking over run {run_id}; is it running?"
        )
    return record


def submit_run_op(
    target: RunTarget, op: str, params: Mapping[str, Any], seq_id: int | None
) -> Submitted:
    """Queue ``op`` with ``params`` on the run's queue under a (possibly client-given) seq_id.

    One round trip: the store's submit script checks the run, claims the seq_id, records the
    future and queues the message, or does none of it (TooManyQueuedOps, 429, when the
    caller's tenant is at its limit of unfinished ops).
    """
    run_id = target.run_id
    queue = names.run_queue(run_id)
    future = FutureRecord(
        future_id=new_id("fut_"),
        op=op,
        queue=queue,
        submitted_at=time.time(),
        run_id=run_id,
        seq_id=seq_id,
        worker=None,  # the submit script records the worker the run record names
        tenant=caller().tenant,
    )
    message = _message(op, {"run_id": run_id, **params}, future.future_id, queue, with_seq=True)
    digest = body_hash({"op": op, **params})
    store = services().store
    try:
        claim = quota.within_op_limit(
            lambda limit: store.submit_op(run_id, seq_id, digest, future, message, limit)
        )
    except UnknownRun:
        services().run_targets.drop(run_id)
        raise
    return Submitted(claim.future_id, claim.seq_id, run_id)


def submit_shared(
    op: str, params: Mapping[str, Any], run: RunRecord | None = None, counted: bool = True
) -> Submitted:
    """Queue a read-only operation: on the run's queue when it uses live run weights.

    ``counted``: it counts against the caller's limit of unfinished ops (TooManyQueuedOps,
    429, at the limit); a run's deletion does not, so a tenant can always free what it holds.
    """
    store = services().store
    future_id = new_id("fut_")
    queue = names.run_queue(run.run_id) if run else names.SAMPLE_QUEUE
    if run is None and not store.live_workers():
        raise ServiceUnavailable(no_live_worker(store))
    future = FutureRecord(
        future_id=future_id,
        op=op,
        queue=queue,
        submitted_at=time.time(),
        run_id=run.run_id if run else None,
        worker=run.worker if run else None,
        tenant=caller().tenant,
    )
    message = _message(op, params, future_id, queue)
    if counted:
        quota.within_op_limit(lambda limit: store.queue_op(future, message, limit))
    else:
        store.queue_op(future, message)
    return Submitted(future_id, None, run.run_id if run else None)


def _message(
    op: str, kwargs: Mapping[str, Any], future_id: str, queue: str, *, with_seq: bool = False
) -> QueuedMessage:
    return messages.task_message(services().celery, op, future_id, kwargs, queue, with_seq=with_seq)
