"""Reading a future: Celery's result record, plus what Celery alone cannot tell.

Celery reports PENDING for ids it never saw and for tasks whose worker died; we record every
issued id (unknown -> 404) and check the worker's heartbeat and the operation's age, so a future
never hangs: it fails with a clear message instead. ``wait`` long-polls on the result
backend's pub/sub channels (see ``watcher``). A future of another tenant is unknown too (404):
the caller sees it only if ``caller.sees`` its tenant.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from eztinker_tasks.errors import NotFound
from eztinker_tasks.oplog import OpLog
from eztinker_tasks.store import FutureRecord, WorkerRecord
from eztinker_web.auth import AUTH_OFF, Caller
from eztinker_web.futures.progress import QueuePlaces, progress_body, read_running
from eztinker_web.futures.watcher import META_PREFIX
from eztinker_web.services import Services

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}


def _read_meta(svc: Services, future_id: str) -> dict[str, Any]:
    raw = svc.redis_client.get(META_PREFIX + future_id)
    return json.loads(raw) if raw else {"status": "PENDING"}


def _read_both(svc: Services, future_id: str) -> tuple[FutureRecord | None, dict[str, Any]]:
    """The future's record and its result, in one round trip."""
    pipe = svc.redis_client.pipeline(transaction=False)
    pipe.get(svc.store.future_key(future_id))
    pipe.get(META_PREFIX + future_id)
    raw_record, raw_meta = pipe.execute()
    record = FutureRecord.from_json(raw_record) if raw_record else None
    return record, (json.loads(raw_meta) if raw_meta else {"status": "PENDING"})


def _read_waiting(
    svc: Services, future_id: str, wait_s: float, caller: Caller
) -> tuple[FutureRecord | None, dict[str, Any]]:
    """``_read_both``, then long-poll the result until it is done or ``wait_s`` passes.

    The first read happens once the watcher listens for the result, so it is the only read
    when the result is published later (the usual case). Another tenant's future is answered
    at once, as an unknown one is.
    """
    records: list[FutureRecord | None] = []

    def read() -> dict[str, Any]:
        if records:
            return _read_meta(svc, future_id)
        record, meta = _read_both(svc, future_id)
        records.append(record)
        return meta

    meta = svc.watcher.wait(
        future_id,
        read=read,
        done=lambda meta: (
            records[0] is None
            or not caller.sees(records[0].tenant)
            or meta.get("status") in TERMINAL
        ),
        timeout_s=wait_s,
        stalled=lambda: _stalled(svc, future_id) is not None,
    )
    return records[0], meta


def _stalled(svc: Services, future_id: str) -> dict[str, Any] | None:
    """An error envelope if the future can no longer finish (worker gone, too old)."""
    record = svc.store.get_future(future_id)
    if record is None:
        return None
    return _stall_reason(svc, record, svc.store.started(future_id))


class Workers:
    """Which workers are alive, as stall checks ask it: each name read at most once."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self._named: dict[str, WorkerRecord | None] = {}
        self._any: bool | None = None

    def get(self, name: str) -> WorkerRecord | None:
        if name not in self._named:
            self._named[name] = self._svc.store.worker(name)
        return self._named[name]

    def any_live(self) -> bool:
        if self._any is None:
            self._any = bool(self._svc.store.live_workers())
        return self._any


def _stall_reason(
    svc: Services,
    record: FutureRecord,
    started: dict[str, Any] | None,
    workers: Workers | None = None,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Why an unfinished operation can no longer finish, if it cannot. ``notes["recovering"]``
    is set when it waits for its run's recovery instead.

    - it has run for longer than the operation timeout;
    - the worker that started it is gone, or restarted since (the operation died with it);
    - it has not started and the worker holding its run (or every worker) is gone.

    An op of a recoverable run is not given up in the last two cases while its run can still
    be recovered (``_recovery_wait``): the recovery answers it with its real result.
    """
    workers = workers or Workers(svc)
    now = time.time()
    if started:
        worker_name = str(started.get("worker"))
        if now - float(started["at"]) > svc.settings.op_timeout_s + 60:
            return _error(
                "timeout",
                f"operation {record.op} has run for over {svc.settings.op_timeout_s:.0f} s "
                f"on worker {worker_name}; it was abandoned",
            )
        worker = workers.get(worker_name)
        if worker is not None and worker.started_at <= float(started["at"]):
            return None
        if worker is None:
            lost = _error(
                "worker_gone",
                f"worker {worker_name} died while running this operation (it no longer "
                "reports itself alive: its heartbeat lapsed, or it was replaced after dying)",
            )
        else:
            lost = _error(
                "worker_gone",
                f"worker {worker_name} restarted while running this operation; it was lost",
            )
        return _recovery_wait(svc, record, lost, True, workers, notes)
    if record.worker:
        if workers.get(record.worker) is None:
            lost = _error(
                "worker_gone",
                f"worker {record.worker} that holds run {record.run_id} is not alive (it no "
                "longer reports itself alive), so the operation cannot run; load a saved state "
                "to move the run to a live worker",
            )
            return _recovery_wait(svc, record, lost, False, workers, notes)
    elif not workers.any_live():
        return _error("worker_gone", "no live worker to run this operation")
    return None


def _recovery_wait(
    svc: Services,
    record: FutureRecord,
    lost: dict[str, Any],
    started: bool,
    workers: Workers,
    notes: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """None while the op's run will be recovered (and the op answered then); else ``lost``.

    An op of a recoverable run waits if it is logged (it has a seq_id: the recovery applies
    it) or had not started (its message waits in the run's queue for the run's next worker):
    while the run's worker is alive (restarted, or the adopter) or any worker is starting, or,
    with neither, for ``EZTINKER_REHOME_AFTER_S`` plus a grace period for a live worker to
    adopt the run. After that it fails with ``lost``, recorded as its result, so that it is
    not applied later. A sample that was running on the dead worker fails at once.
    """
    if record.run_id is None or (started and record.seq_id is None):
        return lost
    run = svc.store.get_run(record.run_id)
    if run is None or not run.recoverable or run.status in ("deleted", "failed", "lost"):
        return lost
    store = svc.store
    if notes is not None:
        notes["recovering"] = run.run_id
    if workers.get(run.worker) is not None:
        return None
    if store.starting_workers():  # its own worker restarting, or one that may adopt the run
        return None
    settings = svc.settings
    grace = settings.rehome_after_s + 4 * settings.worker_heartbeat_s + settings.worker_ttl_s + 10
    orphaned = OpLog(svc.redis_client).orphaned_since(run.run_id)
    if time.time() - orphaned < grace:
        return None
    lost = _error(
        "worker_gone",
        f"{lost['message']}; no live worker took over run {run.run_id} within {grace:.0f} s "
        "(it recovers by itself once a worker runs again; this operation is not applied)",
    )
    _record_failure(svc, record.future_id, lost)
    return lost


def _record_failure(svc: Services, future_id: str, error: dict[str, Any]) -> None:
    """Store ``error`` as the future's result unless it has one (as a worker would store it)."""
    meta = {
        "status": "FAILURE",
        "result": {
            "exc_type": "OperationFailed",
            "exc_module": "eztinker_tasks.errors",
            "exc_message": [json.dumps(error)],
        },
        "traceback": None,
        "children": [],
        "date_done": datetime.now(UTC).isoformat(),
        "task_id": future_id,
    }
    key = META_PREFIX + future_id
    value = json.dumps(meta)
    if svc.redis_client.set(key, value, nx=True, ex=svc.settings.result_ttl_s):
        svc.redis_client.publish(key, value)


def _error(code: str, message: str, category: str = "server") -> dict[str, Any]:
    return {"code": code, "category": category, "message": message, "errors": {}}


def failure_body(meta: dict[str, Any]) -> dict[str, Any]:
    """The error body of a failed (or revoked) future's result record."""
    result = meta.get("result") or {}
    if meta.get("status") == "REVOKED":
        return _error("revoked", "the operation was cancelled")
    if isinstance(result, dict) and result.get("exc_type") == "OperationFailed":
        args = result.get("exc_message") or []
        raw = args[0] if isinstance(args, list) and args else args
        try:
            env = json.loads(str(raw))
            return {
                "code": env.get("code", "error"),
                "category": env.get("category", "server"),
                "message": env.get("message", ""),
                "errors": env.get("errors") or {},
            }
        except (TypeError, ValueError):
            pass
    if isinstance(result, dict):
        text = f"{result.get('exc_type', 'Error')}: {result.get('exc_message')}"
    else:
        text = str(result)
    return _error("internal", text)


def future_status(
    svc: Services,
    future_id: str,
    wait_s: float = 0.0,
    places: QueuePlaces | None = None,
    caller: Caller = AUTH_OFF,
) -> dict[str, Any]:
    """The future's body; an unfinished one carries its ``progress`` (``futures.progress``).

    ``places`` finds queued futures in their queues (a batch shares one across its futures).
    A future ``caller`` does not see raises NotFound, as an unknown one does.
    """
    if wait_s > 0:
        record, meta = _read_waiting(svc, future_id, wait_s, caller)
    else:
        record, meta = _read_both(svc, future_id)
    if record is None or not caller.sees(record.tenant):
        raise NotFound(f"unknown future {future_id!r}", errors={"future_id": ["not found"]})
    state = meta.get("status", "PENDING")
    body: dict[str, Any] = {
        "future_id": record.future_id,
        "job_id": record.future_id,
        "op": record.op.removeprefix("eztinker."),
        "run_id": record.run_id,
        "seq_id": record.seq_id,
        "submitted_at": record.submitted_at,
        "result": None,
        "error": None,
        "progress": None,
    }
    if state == "SUCCESS":
        body["status"] = "succeeded"
        body["result"] = meta.get("result")
        body["timing"] = timing_body(svc, record, meta, caller)
    elif state in ("FAILURE", "REVOKED"):
        body["status"] = "failed"
        body["error"] = failure_body(meta)
        body["timing"] = timing_body(svc, record, meta, caller)
    else:
        started_key = svc.store.future_key(future_id) + ":started"
        started, published = read_running(svc.redis_client, started_key, future_id)
        notes: dict[str, Any] = {}
        stall = _stall_reason(svc, record, started, notes=notes)
        if stall is not None:
            body["status"] = "failed"
            body["error"] = stall
        else:
            # A call coalesced into another's pass publishes progress before it starts.
            running = state in ("STARTED", "RETRY") or started is not None or bool(published)
            body["status"] = "running" if running else "pending"
            places = places if places is not None else QueuePlaces(svc.redis_client)
            body["progress"] = progress_body(record, running, started, published, places)
            if notes.get("recovering"):  # its worker died: the run's recovery answers it
                body["progress"]["phase"] = "recovering"
    return body


def timing_body(
    svc: Services,
    record: FutureRecord,
    meta: dict[str, Any],
    caller: Caller,
    started: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """How long a finished operation waited in its queue and ran (milliseconds).

    ``queued_ms``: from its submit to the start of its operation (for a call answered in
    another call's pass, the start of that pass, whose future is ``in_pass_of``, named only
    when the caller sees that future: a pass can hold other tenants' calls); ``run_ms``:
    from that start to its result. None where the start was not recorded (an older server).
    ``started``: the op's start marker, if the caller read it already.
    """
    started = started or svc.store.started(record.future_id)
    done_at = meta.get("date_done")
    if not started or not isinstance(done_at, str):
        return None
    try:
        done = datetime.fromisoformat(done_at)
        if done.tzinfo is None:
            done = done.replace(tzinfo=UTC)
        start = float(started["at"])
    except (KeyError, TypeError, ValueError):
        return None
    timing: dict[str, Any] = {
        "queued_ms": round(max(0.0, start - record.submitted_at) * 1e3, 3),
        "run_ms": round(max(0.0, done.timestamp() - start) * 1e3, 3),
    }
    lead = started.get("pass")
    if lead and (lead == record.future_id or caller.sees_all or _owner(svc, lead) == caller.tenant):
        timing["in_pass_of"] = lead
    return timing


def _owner(svc: Services, future_id: str) -> str | None:
    lead = svc.store.get_future(future_id)
    return lead.tenant if lead else None


def finished(svc: Services, future_ids: list[str]) -> list[str]:
    """Those of ``future_ids`` that are done, as ``future_status`` would say: succeeded,
    failed (also by a stall: its worker is gone, or it ran past the timeout), or unknown
    (expired). Three reads per future, in one round trip, plus one per worker asked about."""
    if not future_ids:
        return []
    pipe = svc.redis_client.pipeline(transaction=False)
    for future_id in future_ids:
        key = svc.store.future_key(future_id)
        pipe.get(key)
        pipe.get(META_PREFIX + future_id)
        pipe.get(key + ":started")
    out = pipe.execute()
    workers = Workers(svc)
    done = []
    for i, future_id in enumerate(future_ids):
        raw_record, raw_meta, raw_started = out[3 * i : 3 * i + 3]
        meta = json.loads(raw_meta) if raw_meta else {}
        if raw_record is None or meta.get("status") in TERMINAL:
            done.append(future_id)
            continue
        started = json.loads(raw_started) if raw_started else None
        record = FutureRecord.from_json(raw_record)
        if _stall_reason(svc, record, started, workers) is not None:
            done.append(future_id)
    return done


def future_statuses(
    svc: Services, future_ids: list[str], wait_s: float, caller: Caller = AUTH_OFF
) -> list[dict[str, Any]]:
    """``future_status`` of each id, waiting at most ``wait_s`` in all for them to finish."""
    deadline = time.monotonic() + wait_s
    places = QueuePlaces(svc.redis_client, whole=True)
    out = []
    for future_id in future_ids:
        left = max(0.0, deadline - time.monotonic())
        out.append(future_status(svc, future_id, left, places, caller))
    return out
