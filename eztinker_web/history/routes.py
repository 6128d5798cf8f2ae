"""`GET /v1/runs/<id>/metrics` and `GET /v1/runs/<id>/operations`: a run's history.

The metrics history is every ``forward_backward`` and ``optim_step`` metric of the run with
its step and time (``eztinker_tasks.metrics_history``: written by whoever stores the op's
result, once per seq_id), as JSON or CSV. The operations are the run's newest ops with their
status and timing, read from their future records (kept ``EZTINKER_RESULT_TTL_S``). A run of
another tenant answers 404, as a missing one does.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from flask import Response, request

from eztinker_tasks.metrics_history import MetricPoint, read_points
from eztinker_tasks.store import FutureRecord
from eztinker_web import dispatch
from eztinker_web.auth import Caller, caller
from eztinker_web.blueprint import Blueprint
from eztinker_web.futures.status import failure_body, timing_body
from eztinker_web.futures.watcher import META_PREFIX
from eztinker_web.history.schemas import (
    MetricsQuerySchema,
    MetricsSchema,
    OperationsQuerySchema,
    OperationsSchema,
)
from eztinker_web.services import services

blp = Blueprint(
    "history", __name__, url_prefix="/v1/runs", description="A run's metrics and operations"
)

# The 200 answer in both forms (flask-smorest's own would list JSON only).
CSV_DOC = {
    "200": {
        "description": "OK",
        "content": {
            "application/json": {"schema": MetricsSchema},
            "text/csv": {"schema": {"type": "string"}},
        },
    }
}
FIXED_COLUMNS = ["seq_id", "op", "step", "time"]


def wants_csv(fmt: str | None) -> bool:
    """``format`` decides; without it, the Accept header (JSON unless CSV is preferred)."""
    if fmt is not None:
        return fmt == "csv"
    return request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv"


def points_csv(points: list[MetricPoint]) -> str:
    """One row per point: seq_id, op, step, time, then every metric name (sorted; empty where
    the op has no such metric). An optim_step's own ``step`` metric is the step column."""
    names = sorted({k for p in points for k in p.metrics} - set(FIXED_COLUMNS))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*FIXED_COLUMNS, *names])
    for p in points:
        writer.writerow(
            [
                p.seq_id,
                p.op,
                p.step,
                repr(p.time),
                *(repr(p.metrics[n]) if n in p.metrics else "" for n in names),
            ]
        )
    return out.getvalue()


@blp.route("/<run_id>/metrics", methods=["GET"])
@blp.arguments(MetricsQuerySchema(), location="query")
@blp.response(200, MetricsSchema)
@blp.doc(responses=CSV_DOC)
@blp.errors(404)
def metrics(args: dict[str, Any], run_id: str):
    """Every forward_backward and optim_step metric of the run, with its step and time, in
    seq_id order (`?format=csv` or `Accept: text/csv`: CSV, one row per op)."""
    record = dispatch.live_run(run_id)
    points = read_points(services().redis_client, record.run_id, args["after"])
    if wants_csv(args.get("format")):
        return Response(
            points_csv(points),
            mimetype="text/csv",
            headers={"Content-Disposition": f'inline; filename="{record.run_id}-metrics.csv"'},
        )
    return {"run_id": record.run_id, "points": points}


@blp.route("/<run_id>/operations", methods=["GET"])
@blp.arguments(OperationsQuerySchema(), location="query")
@blp.response(200, OperationsSchema)
@blp.errors(404)
def operations(args: dict[str, Any], run_id: str):
    """The run's newest operations (newest first): status, worker and timing of each (ops
    whose future has expired are left out). Statuses are as recorded: `GET /v1/futures/<id>`
    also tells an op whose worker died (failed, or waiting for its run's recovery)."""
    record = dispatch.live_run(run_id)
    svc = services()
    r = svc.redis_client
    last = svc.store.last_seq(run_id)
    seqs = list(range(last, max(0, last - args["limit"]), -1))
    ids = list(svc.store.op_futures(run_id, seqs).values())
    pipe = r.pipeline(transaction=False)
    for future_id in ids:
        key = svc.store.future_key(future_id)
        pipe.get(key)
        pipe.get(META_PREFIX + future_id)
        pipe.get(key + ":started")
    raws = pipe.execute()
    who = caller()
    out = []
    for i in range(len(ids)):
        raw_record, raw_meta, raw_started = raws[3 * i : 3 * i + 3]
        if not raw_record:
            continue
        future = FutureRecord.from_json(raw_record)
        meta = json.loads(raw_meta) if raw_meta else {"status": "PENDING"}
        started = json.loads(raw_started) if raw_started else None
        out.append(operation_body(future, meta, started, who))
    return {"run_id": record.run_id, "operations": out}


def operation_body(
    future: FutureRecord, meta: dict[str, Any], started: dict[str, Any] | None, who: Caller
) -> dict[str, Any]:
    """One op as the list shows it, from its future record, result record and start marker."""
    state = meta.get("status", "PENDING")
    done = state in ("SUCCESS", "FAILURE", "REVOKED")
    if state == "SUCCESS":
        status = "succeeded"
    elif done:
        status = "failed"
    else:
        status = "running" if started is not None or state == "STARTED" else "pending"
    worker = (started or {}).get("worker") or future.worker
    return {
        "future_id": future.future_id,
        "seq_id": future.seq_id,
        "op": future.op.removeprefix("eztinker."),
        "status": status,
        "submitted_at": future.submitted_at,
        "worker": worker,
        "timing": timing_body(services(), future, meta, who, started) if done else None,
        "error": failure_body(meta) if done and status == "failed" else None,
    }
