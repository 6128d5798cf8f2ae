"""``retrieve_future``: an EZTinker future shown as Tinker shows it.

Pending after a 25 s long-poll -> ``{"type": "try_again"}`` (the SDK re-polls at once, and
times out at 45 s); failed -> 200 ``{"error", "category"}`` (never 5xx, which the SDK re-polls
forever); done -> the result in the shape of the request's kind, as protobuf for
``ForwardBackwardOutput`` and ``SampleResponse``.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify

from eztinker_tasks.types import CheckpointInfo
from eztinker_web.auth import caller
from eztinker_web.futures.status import future_status
from eztinker_web.services import services
from eztinker_web.tinker_api import paths, proto, state

LONG_POLL_S = 25.0


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    raw = result.get("metrics")
    source = raw if isinstance(raw, dict) else result
    return {k: float(v) for k, v in source.items() if isinstance(v, int | float)}


def retrieve(request_id: str, wait_s: float = LONG_POLL_S) -> Response:
    """The reply to one ``retrieve_future`` poll."""
    body = future_status(services(), request_id, wait_s, caller=caller())
    if body["status"] == "failed":
        error = body["error"] or {}
        category = "user" if error.get("category") == "user" else "server"
        return jsonify({"error": error.get("message") or "failed", "category": category})
    if body["status"] != "succeeded":
        return jsonify({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    result = body["result"] or {}
    request = state.get_request(request_id) or state.TinkerRequest(kind="raw")
    if request.kind == "create_model":
        return jsonify({"model_id": request.model_id, "type": "create_model"})
    if request.kind == "forward_backward":
        return Response(proto.encode_forward_backward(result), mimetype=proto.PROTO_TYPE)
    if request.kind == "optim_step":
        return jsonify({"metrics": _metrics(result)})
    if request.kind in ("save_weights", "save_weights_for_sampler"):
        path = paths.from_checkpoint(CheckpointInfo.from_dict(result))
        return jsonify({"path": path, "type": request.kind})
    if request.kind == "sampling_session":
        body = {"sampling_session_id": request.sampler_id, "type": "save_weights_for_sampler"}
        return jsonify(body)
    if request.kind == "load_weights":
        return jsonify({"model_id": request.model_id, "type": "load_weights"})
    if request.kind == "sample":
        data = proto.encode_sample(result, request.last_n)
        return Response(data, mimetype=proto.PROTO_TYPE)
    return jsonify(result)
