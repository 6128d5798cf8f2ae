"""Sampling on ``/api/v1``: sampling sessions, ``GET samplers/<id>`` and ``asample``.

A sampling session names a base model or a checkpoint (``tinker://...`` in, an EZTinker
checkpoint behind it); ``asample`` is ``POST /v1/sample`` on it (the same checks, queue and
engine), answered with one ``sample_sequence_ids`` entry per sample (a resend of the same
``sampling_session_id`` + ``seq_id`` and body gets the same future); the result is a protobuf
``SampleResponse``. ``compute_logprobs`` is an ``asample`` with ``prompt_logprobs``.
"""

from __future__ import annotations

from typing import Any

from flask import jsonify
from marshmallow import ValidationError

from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.store import body_hash
from eztinker_web import base_models
from eztinker_web.auth import caller
from eztinker_web.sampling.routes import submit_sample
from eztinker_web.sampling.schemas import SampleSchema
from eztinker_web.tinker_api import paths, snapshots, state
from eztinker_web.tinker_api.wire import blp, body_of, field


@blp.post("/create_sampling_session")
def create_sampling_session():
    """A session on ``base_model`` or on the checkpoint ``model_path`` (exactly one)."""
    body = body_of()
    session_id = field(body, "session_id", str)
    n = field(body, "sampling_session_seq_id", int)
    base = field(body, "base_model", str, None)
    model_path = field(body, "model_path", str, None)
    if (base is None) == (model_path is None):
        raise InvalidRequest(
            "give exactly one of base_model and model_path", errors={"model_path": []}
        )
    checkpoint = None
    if model_path is not None:
        info = paths.to_checkpoint(model_path)
        base, checkpoint = info.base_model, info.path
    assert base is not None
    base_models.check_model_name(base)
    sampler_id = f"{session_id}:sample:{n}"
    state.put_sampler(state.Sampler(sampler_id, base, checkpoint, model_path, caller().tenant))
    return jsonify({"sampling_session_id": sampler_id, "type": "create_sampling_session"})


@blp.get("/samplers/<sampler_id>")
def get_sampler(sampler_id: str):
    """A sampling session's base model and checkpoint path."""
    sampler = state.get_sampler(sampler_id)
    return jsonify(
        {
            "sampler_id": sampler.sampler_id,
            "base_model": sampler.base_model,
            "model_path": sampler.model_path,
        }
    )


def _prompt_tokens(prompt: Any) -> list[int]:
    chunks = prompt.get("chunks") if isinstance(prompt, dict) else None
    if not isinstance(chunks, list):
        raise InvalidRequest("prompt must be a ModelInput", errors={"prompt": ["no chunks"]})
    tokens: list[int] = []
    for chunk in chunks:
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            raise InvalidRequest(
                "only encoded_text prompt chunks are supported", errors={"prompt": []}
            )
        tokens.extend(chunk.get("tokens") or [])
    return tokens


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
        if body.get(name):
            raise InvalidRequest(f"{name} is not supported", errors={name: ["not supported"]})
    if body.get("target_prompt_logprobs") is not None:
        raise InvalidRequest(
            "target_prompt_logprobs is not supported", errors={"target_prompt_logprobs": []}
        )


@blp.post("/asample")
def asample():
    """Sample ``num_samples`` sequences from a session's (or a base model's) weights."""
    body = body_of()
    _refuse_unsupported(body)
    sampler_id = field(body, "sampling_session_id", str, None)
    seq_id = field(body, "seq_id", int, None)
    key = digest = None
    if sampler_id is not None and seq_id is not None:  # the SDK resends on timeouts
        key, digest = state.sample_key(sampler_id, seq_id), body_hash(body)
        seen = state.resubmitted_sample(key, digest)
        if seen is not None:
            state.get_sampler(sampler_id)  # 404 for another tenant's session
            return _submitted(*seen)
    if sampler_id is not None:
        sampler = state.get_sampler(sampler_id)
        if sampler.checkpoint:
            snapshots.check_kept(sampler.checkpoint)
        source = (
            {"checkpoint": sampler.checkpoint}
            if sampler.checkpoint
            else {"base_model": sampler.base_model}
        )
    elif body.get("model_path"):
        source = {"checkpoint": paths.to_checkpoint(field(body, "model_path", str)).path}
    else:
        source = {"base_model": field(body, "base_model", str)}
    params = field(body, "sampling_params", dict, {}) or {}
    last_n = field(body, "prompt_logprobs_last_n", int, None)
    wanted = {k: params[k] for k in ("temperature", "top_p", "top_k", "seed") if k in params}
    if params.get("max_tokens") is not None:
        wanted["max_tokens"] = params["max_tokens"]
    if "stop" in params:
        wanted["stop"] = params["stop"]
    raw = {
        **source,
        **wanted,
        "prompt_tokens": _prompt_tokens(body.get("prompt")),
        "num_samples": field(body, "num_samples", int, 1),
        "prompt_logprobs": bool(body.get("prompt_logprobs")) or last_n is not None,
    }
    try:
        req = SampleSchema().load(raw)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid sample request: {exc.messages}", errors={}) from None
    future_id = submit_sample(req).future_id
    if key is not None and digest is not None:
        state.remember_sample(key, digest, future_id, req.num_samples)
    state.put_request(
        future_id, state.TinkerRequest("sample", sampler_id=sampler_id, last_n=last_n)
    )
    return _submitted(future_id, req.num_samples)


def _submitted(future_id: str, num_samples: int):
    ids = [f"{future_id}:{i}" for i in range(num_samples)]
    return jsonify({"request_id": future_id, "sample_sequence_ids": ids})
