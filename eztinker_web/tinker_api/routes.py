"""``/api/v1``: the endpoints the official ``tinker`` SDK (0.38) calls, onto ``/v1``'s operations.

Handshake and sessions (``client/config``, ``create_session``, heartbeat, telemetry,
``sessions/<id>/finish``) are accepted and remembered only as far as the SDK needs. A
``create_model`` is ``POST /v1/runs``; ``forward_backward`` (protobuf) and ``optim_step`` are
the run's own operations, with the SDK's ``seq_id`` as the run's seq_id, so ordering,
idempotency (a resubmit with the same seq_id and body gets the same future) and the engine are
``/v1``'s. Submits only queue; ``retrieve_future`` long-polls (``futures``).

Not in ``/openapi.json``: this is Tinker's wire format, specified by the SDK it serves (whose
client validates every reply), with protobuf bodies an OpenAPI JSON schema cannot describe;
``/v1`` is the documented API. It is a plain Flask blueprint, so the fuzz test of the spec
does not see it. Errors use ``/v1``'s envelope and statuses, which the SDK raises as
``tinker.BadRequestError`` / ``NotFoundError`` / ...
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, jsonify, request
from marshmallow import ValidationError

from eztinker_tasks import catalog, names
from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.limits import check_adam_params, check_lora_spec
from eztinker_tasks.types import AdamParams, LoraSpec
from eztinker_web import dispatch
from eztinker_web.auth import caller
from eztinker_web.runs.routes import check_forward
from eztinker_web.runs.schemas import ForwardBackwardSchema
from eztinker_web.services import services
from eztinker_web.tinker_api import futures, proto, state

blp = Blueprint("tinker_api", __name__, url_prefix="/api/v1")


def _body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if body is None and request.content_length:
        raise InvalidRequest("the body must be a JSON object", errors={"json": ["not JSON"]})
    if body is not None and not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", errors={"json": ["not an object"]})
    return body or {}


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...):
    value = body.get(name, default)
    if value is ...:
        raise InvalidRequest(f"{name} is required", errors={name: ["required"]})
    if value is not default and (
        (isinstance(value, bool) and kind is int) or not isinstance(value, kind)
    ):
        raise InvalidRequest(f"{name} has the wrong type", errors={name: ["wrong type"]})
    return value


# -- handshake and sessions -------------------------------------------------------------------
@blp.post("/client/config")
def client_config():
    """Feature flags: plain httpx, no JWT exchange, fwd/bwd chunks sent in seq_id order."""
    return jsonify(
        {
            "pjwt_auth_enabled": False,
            "use_pyqwest_transport": False,
            "parallel_fwdbwd_chunks": False,
        }
    )


@blp.post("/create_session")
def create_session():
    """A new session id; the session is the caller's tenant's."""
    session_id = f"ses_{uuid.uuid4().hex}"
    state.put_session(session_id)
    return jsonify({"session_id": session_id, "type": "create_session"})


@blp.post("/session_heartbeat")
def session_heartbeat():
    """Accepted; sessions hold nothing that expires with their heartbeats."""
    return jsonify({"type": "session_heartbeat"})


@blp.post("/telemetry")
def telemetry():
    """Accepted and dropped."""
    return jsonify({"status": "accepted"})


@blp.post("/sessions/<session_id>/finish")
def finish_session(session_id: str):
    """Accepted: the session's runs stay (delete them with ``DELETE /v1/runs/<id>``)."""
    return jsonify({"session_id": session_id})


@blp.get("/healthz")
def healthz():
    """Always ok while the web answers (``/health`` tells about the workers)."""
    return jsonify({"status": "ok"})


@blp.get("/get_server_capabilities")
def get_server_capabilities():
    """The built-in models, trainable and sampleable."""
    models = [
        {
            "model_name": spec.name,
            "max_context_length": spec.max_context,
            "trainable": True,
            "sampleable": True,
        }
        for spec in catalog.BUILTIN_MODELS.values()
    ]
    return jsonify({"supported_models": models})


# -- training ---------------------------------------------------------------------------------
@blp.post("/create_model")
def create_model():
    """A LoRA training client's model: a new run, named ``{session_id}:train:{model_seq_id}``."""
    body = _body()
    session_id = _field(body, "session_id", str)
    model_seq_id = _field(body, "model_seq_id", int)
    base = _field(body, "base_model", str)
    raw = _field(body, "lora_config", dict, {}) or {}
    lora = LoraSpec(
        rank=raw.get("rank", 32),
        seed=raw.get("seed"),
        train_attn=raw.get("train_attn", True),
        train_mlp=raw.get("train_mlp", True),
        train_unembed=raw.get("train_unembed", True),
    )
    check_lora_spec(lora)
    dispatch.check_model_name(base)
    model_id = state.model_id_of(session_id, model_seq_id)
    placeholder = state.TinkerModel(model_id, "", base, lora.rank, "", caller().tenant)
    existing = state.claim_model(placeholder)
    if existing is not None:  # a retried create: the same future
        state.get_model(model_id)  # 404 for another tenant's id
        return jsonify({"request_id": existing.create_future, "model_id": model_id})
    try:
        record, submitted = dispatch.create_run(base, lora.to_dict(), None, True)
    except Exception:
        state.drop_model(model_id)
        raise
    state.update_model(
        state.TinkerModel(
            model_id, record.run_id, base, lora.rank, submitted.future_id, record.tenant
        )
    )
    state.put_request(submitted.future_id, state.TinkerRequest("create_model", model_id))
    return jsonify({"request_id": submitted.future_id, "model_id": model_id})


@blp.post("/get_info")
def get_info():
    """The model's base model and a tokenizer directory the client can load offline."""
    model = state.get_model(_field(_body(), "model_id", str))
    dispatch.live_run(model.run_id)
    tokenizer = None
    if model.base_model in catalog.BUILTIN_MODELS:
        tokenizer = str(catalog.ensure_tokenizer(model.base_model, services().settings.data_dir))
    else:
        directory = catalog.tokenizer_dir(model.base_model, services().settings.data_dir)
        tokenizer = str(directory) if catalog.has_tokenizer(directory) else None
    return jsonify(
        {
            "model_id": model.model_id,
            "model_data": {"model_name": model.base_model, "tokenizer_id": tokenizer},
            "is_lora": True,
            "lora_rank": model.lora_rank,
            "type": "get_info",
        }
    )


@blp.post("/forward_backward")
def forward_backward():
    """A protobuf ``ForwardBackwardRequest``: the run's forward_backward, or forward if
    ``forward_only``; the result is a protobuf ``ForwardBackwardOutput``."""
    if request.mimetype != proto.PROTO_TYPE:
        raise InvalidRequest(
            f"forward_backward takes a {proto.PROTO_TYPE} body (tinker SDK >= 0.25)",
            errors={"Content-Type": ["expected protobuf"]},
        )
    call = proto.decode_forward_backward(request.get_data())
    model = state.get_model(call.model_id)
    schema_body = {
        "data": call.data,
        "loss_fn": call.loss_fn,
        "loss_fn_config": call.loss_fn_config,
        "seq_id": call.seq_id,
    }
    try:
        req = ForwardBackwardSchema().load(schema_body)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid forward_backward: {exc.messages}", errors={}) from None
    target, params = check_forward(model.run_id, req)
    op = names.FORWARD if call.forward_only else names.FORWARD_BACKWARD
    submitted = dispatch.submit_run_op(target, op, params, req.seq_id)
    state.put_request(submitted.future_id, state.TinkerRequest("forward_backward", model.model_id))
    return jsonify({"request_id": submitted.future_id, "model_id": model.model_id})


@blp.post("/optim_step")
def optim_step():
    """One AdamW step of the run (``adam_params``; other optimizers are refused)."""
    body = _body()
    model = state.get_model(_field(body, "model_id", str))
    seq_id = _field(body, "seq_id", int, None)
    if body.get("optimizer_params") is not None:
        raise InvalidRequest("only adam_params is supported", errors={"optimizer_params": []})
    raw = _field(body, "adam_params", dict, {}) or {}
    try:
        adam = AdamParams.from_dict(raw)
    except (TypeError, ValueError):
        raise InvalidRequest("adam_params must hold numbers", errors={"adam_params": []}) from None
    check_adam_params(adam)
    target = dispatch.run_target(model.run_id)
    submitted = dispatch.submit_run_op(target, names.OPTIM_STEP, {"adam": adam.to_dict()}, seq_id)
    state.put_request(submitted.future_id, state.TinkerRequest("optim_step", model.model_id))
    return jsonify({"request_id": submitted.future_id, "model_id": model.model_id})


# -- futures ----------------------------------------------------------------------------------
@blp.post("/retrieve_future")
def retrieve_future():
    """Long-poll one request: its result, ``try_again``, or ``{"error", "category"}``."""
    return futures.retrieve(_field(_body(), "request_id", str))
