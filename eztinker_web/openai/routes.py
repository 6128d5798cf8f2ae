"""``/openai/v1``: ``GET models``, ``POST completions``, ``POST chat/completions``.

A request becomes a ``/v1/sample`` request (``sampling.routes.submit_sample``: the same checks,
queue, batching and decode loop; the same seed gives the same tokens), sent with
``stream=True`` when the client streams. Without streaming the view waits on the sample's
future (the result watcher's pub/sub wake-up, in slices of ``WAIT_SLICE_S``, at most
``Settings.op_timeout_s``), so the thread waits but no worker is held. Not in
``/openapi.json``: these routes follow OpenAI's API, documented by OpenAI (and in the README),
with OpenAI's error object (``openai.errors``).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from flask import Blueprint, Response, jsonify, request

from eztinker_tasks import errors as ezt_errors
from eztinker_tasks.errors import (
    Conflict,
    EZTinkerError,
    InvalidRequest,
    OperationTimeout,
    ServiceUnavailable,
    UnknownModel,
)
from eztinker_tasks.types import SamplingParams
from eztinker_web import dispatch
from eztinker_web.auth import caller
from eztinker_web.errors import envelope
from eztinker_web.futures.status import future_status
from eztinker_web.openai import chat, models, schemas
from eztinker_web.openai.responses import Reply, finish_reason
from eztinker_web.openai.streaming import sse
from eztinker_web.openai.text import RowText
from eztinker_web.sampling.routes import submit_sample
from eztinker_web.sampling.schemas import SampleRequest
from eztinker_web.services import services

bp = Blueprint("openai", __name__, url_prefix="/openai/v1")

WAIT_SLICE_S = 10.0
CHAT_DEFAULT_MAX_TOKENS = 512  # chat's max_tokens when none is given and the context is unknown


class ContextLengthExceeded(InvalidRequest):
    """The prompt and the tokens asked for do not fit the model's context (OpenAI's code)."""

    code = "context_length_exceeded"


def _check_context(
    req: schemas.GenerationRequest, base: str, prompt: list[int] | None, max_tokens: int
) -> None:
    """ContextLengthExceeded (400) where ``prompt`` + ``max_tokens`` is over ``base``'s
    context, in OpenAI's words; the parameter to shorten is the prompt (or messages) when it
    alone fills the context, else ``max_tokens``. A prompt the web cannot tokenize yet, or a
    model whose context is unknown, is checked by the worker."""
    limits = dispatch.model_limits(base)
    if limits is None or prompt is None:
        return
    context, n = limits[1], len(prompt)
    if n + max_tokens <= context:
        return
    where = "messages" if req.chat else "prompt"
    param = where if n >= context else "max_tokens"
    raise ContextLengthExceeded(
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{n + max_tokens} tokens ({n} in the {where}, {max_tokens} in the completion). "
        f"Please reduce the length of the {where} or completion.",
        errors={param: ["over the model's context"]},
    )


def status_of(code: str | None) -> int:
    """The HTTP status of a failed future's error code (500 if unknown)."""
    stack: list[type[EZTinkerError]] = [EZTinkerError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls.status
        stack.extend(cls.__subclasses__())
    return 500


@bp.get("/models")
def list_models():
    return {"object": "list", "data": models.list_models()}


@bp.get("/models/<path:model>")
def get_model(model: str):
    for entry in models.list_models():
        if entry["id"] == model:
            return entry
    raise ezt_errors.NotFound(
        f"the model {model!r} does not exist", errors={"model": ["not found"]}
    )


@bp.post("/completions")
def completions():
    return _generate(schemas.completion_request(request.get_json(silent=True)))


@bp.post("/chat/completions")
def chat_completions():
    return _generate(schemas.chat_request(request.get_json(silent=True)))


def _prompt(req: schemas.GenerationRequest, base: str) -> list[int] | None:
    """The prompt's tokens; None: a completion's text the worker tokenizes, because the web
    has no tokenizer for ``base`` yet (a worker writes it when it first loads the model)."""
    svc = services()
    if req.prompt_tokens is not None:
        return list(req.prompt_tokens)
    try:
        if req.messages is None:
            tokens = svc.tokenizers.encode(base, req.prompt_text or "")
        else:
            text = chat.render(base, svc.settings.data_dir, list(req.messages))
            tokens = svc.tokenizers.encode(base, text)
    except UnknownModel:
        if req.messages is None:
            return None  # /v1/sample's way: the worker tokenizes the text
        raise Conflict(
            f"the chat template of {base!r} is not here yet: a worker writes a model's "
            "tokenizer files when it first loads it; send a completion (or any sample) on it "
            "first, then chat",
            errors={"model": ["tokenizer not loaded yet"]},
        ) from None
    if not tokens:
        raise InvalidRequest("the prompt has no tokens", errors={"prompt": ["empty"]})
    return tokens


def _max_tokens(req: schemas.GenerationRequest, base: str, prompt: list[int] | None) -> int:
    if req.max_tokens is not None:
        return req.max_tokens
    limits = dispatch.model_limits(base)
    most = services().settings.max_sample_tokens
    if limits is None or prompt is None:
        return min(most, CHAT_DEFAULT_MAX_TOKENS)
    return max(1, min(most, limits[1] - len(prompt)))


def _generate(req: schemas.GenerationRequest):
    svc = services()
    target = models.resolve(req.model)
    base = target.base_model
    if not base:
        raise InvalidRequest(
            f"the base model of {req.model!r} is not known", errors={"model": ["no base model"]}
        )
    prompt = _prompt(req, base)
    max_tokens = _max_tokens(req, base, prompt)
    _check_context(req, base, prompt, max_tokens)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop or None,  # None: EOS only; strings: those and EOS
        seed=req.seed,
        top_logprobs=req.top_logprobs,
    )
    text = req.prompt_text if prompt is None else None
    tokens = None if prompt is None else tuple(prompt)
    sample = SampleRequest(target.source, text, tokens, req.n, params, False)
    submitted = submit_sample(sample, stream=req.stream)
    reply = Reply(
        req,
        submitted.future_id,
        # loaded when first used: by then the worker has written the tokenizer
        token_text=lambda t: svc.tokenizers.decode(base, [t], skip_special_tokens=False),
        prompt_tokens=None if prompt is None else len(prompt),
    )
    decode = partial(svc.tokenizers.decode, base)
    rows = [RowText(decode, req.stop) for _ in range(req.n)]
    timeout_s = float(svc.settings.op_timeout_s)
    if req.stream:
        stream = sse(svc, caller(), reply, rows, timeout_s, status_of)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return Response(stream, mimetype="text/event-stream", headers=headers)
    body = _wait(submitted.future_id, timeout_s)
    if body["status"] == "failed":
        error = body["error"] or {}
        status = status_of(error.get("code"))
        return jsonify(
            envelope(
                status, error.get("code", "error"), error.get("message", ""), error.get("errors")
            )
        ), status
    finishes = []
    reply.prompt_tokens = len(body["result"]["prompt_tokens"])
    for row, seq in zip(rows, body["result"]["sequences"], strict=True):
        row.add(seq["tokens"], seq["logprobs"], seq.get("top_logprobs"))
        finishes.append(finish_reason(seq["stop_reason"], row))
    return reply.whole(rows, finishes)


def _wait(future_id: str, timeout_s: float) -> dict[str, Any]:
    """The future's body once it is done; OperationTimeout (504) after ``timeout_s``;
    ServiceUnavailable (503: send it again) at once when this process is stopping."""
    deadline = time.monotonic() + timeout_s
    svc, who = services(), caller()
    while True:
        left = deadline - time.monotonic()
        body = future_status(svc, future_id, max(0.0, min(WAIT_SLICE_S, left)), caller=who)
        if body["status"] in ("succeeded", "failed"):
            return body
        if svc.closing:  # long-polls answer at once now: this loop would spin until killed
            raise ServiceUnavailable("the server is stopping: send the request again")
        if left <= 0:
            raise OperationTimeout(f"no result within {timeout_s:g} s")
