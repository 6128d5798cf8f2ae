"""``/api/v1``: the endpoints the official ``tinker`` SDK (0.38) calls, onto ``/v1``'s operations.

Handshake and sessions (``client/config``, ``create_session``, heartbeat, telemetry,
``sessions/<id>/finish``) are accepted and remembered only as far as the SDK needs. A
``create_model`` is ``POST /v1/runs``; ``forward_backward`` (protobuf) and ``optim_step`` are
the run's own operations, with the SDK's ``seq_id`` as the run's seq_id, so ordering,
idempotency (a resubmit with the same seq_id and body gets the same future) and the engine are
``/v1``'s. Submits only queue; ``retrieve_future`` long-polls (``futures``). Checkpoints
(``save_weights*``, ``load_weights``) use ``tinker://`` paths (``paths``); sampling lives in
``sampling``, the RestClient's listings in ``rest``, the ids Tinker adds in ``state``.

Not in ``/openapi.json``: this is Tinker's wire format, specified by the SDK it serves (whose
client validates every reply), with protobuf bodies an OpenAPI JSON schema cannot describe;
``/v1`` is the documented API. It is a plain Flask blueprint, so the fuzz test of the spec
does not see it. Errors use ``/v1``'s envelope and statuses, which the SDK raises as
``tinker.BadRequestError`` / ``NotFoundError`` / ...
"""

from __future__ import annotations

import uuid

from flask import jsonify, request
from marshmallow import ValidationError

from eztinker_tasks import catalog, checkpoint_paths, names
from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.limits import check_adam_params, check_lora_spec
from eztinker_tasks.types import AdamParams, LoraSpec
from eztinker_web import base_models, dispatch
from eztinker_web.auth import caller
from eztinker_web.checkpoints.listing import loadable_checkpoint
from eztinker_web.runs.routes import check_forward
from eztinker_web.runs.schemas import ForwardBackwardSchema
from eztinker_web.services import services
from eztinker_web.tinker_api import futures, paths, proto, snapshots, state
from eztinker_web.tinker_api.wire import blp, body_of, field


# -- handshake and sessions -------------------------------------------------------------------
@blp.post("/client/config")
def client_config():
    """Feature flags: plain httpx, no JWT exchange, fwd/bwd chunks sent in seq_id order.

    The SDK would send a large forward_backward's chunks at once, first chunk last; a run
    refuses a seq_id below its latest (it would run out of order), so chunks go one by one.
    """
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
    body = body_of()
    session_id = field(body, "session_id", str)
    model_seq_id = field(body, "model_seq_id", int)
    base = field(body, "base_model", str)
    raw = field(body, "lora_config", dict, {}) or {}
    lora = LoraSpec(
        rank=raw.get("rank", 32),
        seed=raw.get("seed"),
        train_attn=raw.get("train_attn", True),
        train_mlp=raw.get("train_mlp", True),
        train_unembed=raw.get("train_unembed", True),
    )
    check_lora_spec(lora)
    base_models.check_model_name(base)
    model_id = state.model_id_of(session_id, model_seq_id)
    future_id = _create(model_id, base, lora, None, True)
    state.put_request(future_id, state.TinkerRequest("create_model", model_id))
    return jsonify({"request_id": future_id, "model_id": model_id})


def _create(
    model_id: str, base: str, lora: LoraSpec, from_state: str | None, optimizer: bool
) -> str:
    """Create the run behind ``model_id`` (once: a retried create gets the same future)."""
    placeholder = state.TinkerModel(model_id, "", base, lora.rank, "", caller().tenant)
    existing = state.claim_model(placeholder)
    if existing is not None:
        state.get_model(model_id)  # 404 for another tenant's id
        return existing.create_future
    try:
        record, submitted = dispatch.create_run(base, lora.to_dict(), from_state, optimizer)
    except Exception:
        state.drop_model(model_id)
        raise
    state.update_model(
        state.TinkerModel(
            model_id, record.run_id, base, lora.rank, submitted.future_id, record.tenant
        )
    )
    return submitted.future_id


@blp.post("/get_info")
def get_info():
    """The model's base model and a tokenizer directory the client can load offline."""
    model = state.get_model(field(body_of(), "model_id", str))
    dispatch.live_run(model.run_id)
    tokenizer = None
    if model.base_model in catalog.BUILTIN_MODELS:
        tokenizer = str(catalog.ensure_tokenizer(model.base_model, services().settings.data_dir))
    else:
        settings = services().settings
        directory = catalog.find_tokenizer_dir(
            model.base_model, settings.data_dir, settings.checkpoints_dir
        )
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
    body = body_of()
    model = state.get_model(field(body, "model_id", str))
    seq_id = field(body, "seq_id", int, None)
    if body.get("optimizer_params") is not None:
        raise InvalidRequest("only adam_params is supported", errors={"optimizer_params": []})
    raw = field(body, "adam_params", dict, {}) or {}
    try:
        adam = AdamParams.from_dict(raw)
    except (TypeError, ValueError):
        raise InvalidRequest("adam_params must hold numbers", errors={"adam_params": []}) from None
    check_adam_params(adam)
    target = dispatch.run_target(model.run_id)
    submitted = dispatch.submit_run_op(target, names.OPTIM_STEP, {"adam": adam.to_dict()}, seq_id)
    state.put_request(submitted.future_id, state.TinkerRequest("optim_step", model.model_id))
    return jsonify({"request_id": submitted.future_id, "model_id": model.model_id})


# -- checkpoints ------------------------------------------------------------------------------
def _save(model: state.TinkerModel, name: str, kind: str, seq_id: int | None) -> str:
    checkpoint_paths.validate_name(name, "path")
    target = dispatch.run_target(model.run_id)
    params = {"name": name, "kind": kind}
    return dispatch.submit_run_op(target, names.SAVE, params, seq_id).future_id


@blp.post("/save_weights")
def save_weights():
    """``save_state``: the run's state checkpoint (adapter + optimizer), ``tinker://.../weights/``."""
    body = body_of()
    model = state.get_model(field(body, "model_id", str))
    future_id = _save(model, field(body, "path", str), "state", field(body, "seq_id", int, None))
    state.put_request(future_id, state.TinkerRequest("save_weights", model.model_id))
    return jsonify({"request_id": future_id, "model_id": model.model_id})


@blp.post("/save_weights_for_sampler")
def save_weights_for_sampler():
    """A sampler checkpoint: named (``tinker://.../sampler_weights/<path>``), or unnamed for
    ``save_weights_and_get_sampling_client``: then a sampling session on that snapshot."""
    body = body_of()
    model = state.get_model(field(body, "model_id", str))
    seq_id = field(body, "seq_id", int, None)
    name = field(body, "path", str, None)
    if name is not None:
        future_id = _save(model, paths.checkpoint_name("sampler_weights", name), "sampler", seq_id)
        request = state.TinkerRequest("save_weights_for_sampler", model.model_id)
    else:
        n = field(body, "sampling_session_seq_id", int)
        session_id = model.model_id.rsplit(":train:", 1)[0]
        sampler_id = f"{session_id}:sample:{n}"
        snapshot = snapshots.new_name()
        snapshots.prune(model.run_id)  # keep the newest few (RL loops make one per step)
        future_id = _save(model, snapshot, "sampler", seq_id)
        checkpoint = checkpoint_paths.format_path(model.run_id, snapshot)
        state.put_sampler(
            state.Sampler(sampler_id, model.base_model, checkpoint, None, model.tenant)
        )
        request = state.TinkerRequest("sampling_session", model.model_id, sampler_id)
    state.put_request(future_id, request)
    return jsonify({"request_id": future_id, "model_id": model.model_id})


@blp.post("/load_weights")
def load_weights():
    """Load a ``tinker://.../weights/`` state into a model, or (with ``session_id`` and
    ``model_seq_id`` and no ``model_id``) create the model from it: a run made from the state,
    named ``{session_id}:train:{model_seq_id}``, its LoRA shape the checkpoint's."""
    body = body_of()
    info = paths.to_checkpoint(field(body, "path", str))
    optimizer = field(body, "optimizer", bool, False)
    settings = services().settings
    loadable_checkpoint(settings, info.path, optimizer)
    if info.base_model:
        base_models.check_model_name(info.base_model)
    if body.get("model_id") is not None:
        model = state.get_model(field(body, "model_id", str))
        dispatch.rehome(model.run_id)
        target = dispatch.run_target(model.run_id)
        params = {"path": info.path, "optimizer": optimizer}
        seq_id = field(body, "seq_id", int, None)
        future_id = dispatch.submit_run_op(target, names.LOAD, params, seq_id).future_id
    else:
        model_id = state.model_id_of(
            field(body, "session_id", str), field(body, "model_seq_id", int)
        )
        lora = paths.lora_of(info)
        future_id = _create(model_id, info.base_model, lora, info.path, optimizer)
        model = state.get_model(model_id)
    state.put_request(future_id, state.TinkerRequest("load_weights", model.model_id))
    return jsonify({"request_id": future_id, "model_id": model.model_id})


# -- futures ----------------------------------------------------------------------------------
@blp.post("/retrieve_future")
def retrieve_future():
    """Long-poll one request: its result, ``try_again``, or ``{"error", "category"}``."""
    return futures.retrieve(field(body_of(), "request_id", str))
