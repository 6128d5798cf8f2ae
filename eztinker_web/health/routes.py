"""`GET /health`: broker status, the live workers (name, device, runs held) and those starting."""

from __future__ import annotations

import time

from flask import jsonify

from eztinker_tasks.errors import EZTinkerError
from eztinker_web.blueprint import Blueprint
from eztinker_web.health.workers import describe_starting, no_worker_message, starting_workers
from eztinker_web.services import services

blp = Blueprint("health", __name__, description="Service health")


@blp.route("/health", methods=["GET"])
@blp.response(200)
@blp.alt_response(503, description="Broker down, or no live worker (yet: see `starting`)")
def health():
    """200 when the broker answers and at least one worker is alive; 503 otherwise.

    ``status``: ``ok``; ``starting`` (no worker live yet, but some are starting: they are
    listed in ``starting``, with how long they have been at it); ``degraded`` (no worker at
    all); ``down`` (no broker).
    """
    svc = services()
    body: dict = {"status": "ok", "broker": {"ok": False}, "workers": [], "starting": []}
    try:
        started = time.perf_counter()
        svc.ping()
        body["broker"] = {
            "ok": True,
            "latency_ms": round(1000 * (time.perf_counter() - started), 3),
        }
        workers = svc.store.live_workers()
        body["workers"] = [
            {
                "name": w.name,
                "device": w.device,
                "runs": list(w.runs),
                "pid": w.pid,
                "hostname": w.hostname,
                "memory": w.memory,
                "last_heartbeat_s": round(time.time() - w.heartbeat_at, 3),
                "queue_depths": _queue_depths(w.runs),
            }
            for w in workers
        ]
        starting = starting_workers(svc.store, workers)
        body["starting"] = describe_starting(starting)
        runs = svc.store.list_runs()
        body["runs"] = len(runs)
        if not workers:
            body["status"] = "starting" if starting else "degraded"
            body["message"] = no_worker_message(starting)
            return jsonify(body), 503
    except EZTinkerError as exc:
        body["status"] = "down"
        body["message"] = exc.message
        return jsonify(body), 503
    return jsonify(body), 200


def _queue_depths(runs: tuple[str, ...]) -> dict[str, int]:
    from eztinker_tasks.names import SAMPLE_QUEUE, run_queue

    r = services().redis_client
    pipe = r.pipeline()
    queues = [SAMPLE_QUEUE, *(run_queue(run) for run in runs)]
    for q in queues:
        pipe.llen(q)
    return dict(zip(queues, (int(n) for n in pipe.execute()), strict=True))
