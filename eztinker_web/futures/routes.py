"""`GET /v1/futures/<id>`: pending, running, succeeded (with result) or failed (with error).

A future is its tenant's: another tenant's id answers 404, as an unknown one does.
"""

from __future__ import annotations

from typing import Any

from eztinker_web.auth import caller
from eztinker_web.blueprint import Blueprint
from eztinker_web.futures.schemas import (
    BatchRequestSchema,
    BatchSchema,
    FutureSchema,
    WaitSchema,
)
from eztinker_web.futures.status import future_status, future_statuses
from eztinker_web.services import services

blp = Blueprint("futures", __name__, url_prefix="/v1", description="Futures of operations")


@blp.route("/futures/<future_id>", methods=["GET"])
@blp.arguments(WaitSchema(), location="query")
@blp.response(200, FutureSchema)
@blp.errors(404)
def get_future(args: dict[str, Any], future_id: str):
    """The state of an operation; `?wait=S` long-polls until it is done."""
    return future_status(services(), future_id, float(args["wait"]), caller=caller())


@blp.route("/jobs/<future_id>", methods=["GET"])
@blp.arguments(WaitSchema(), location="query")
@blp.response(200, FutureSchema)
@blp.errors(404)
def get_job(args: dict[str, Any], future_id: str):
    """Alias of `/v1/futures/<id>` under the seed's name (job_id)."""
    return future_status(services(), future_id, float(args["wait"]), caller=caller())


@blp.route("/futures/batch", methods=["POST"])
@blp.arguments(BatchRequestSchema())
@blp.response(200, BatchSchema)
@blp.errors(404)
def get_many(args: dict[str, Any]):
    """Many futures at once (for pipelining clients); `wait` long-polls until all are done."""
    wait = float(args["wait"])
    return {"futures": future_statuses(services(), args["future_ids"], wait, caller())}
