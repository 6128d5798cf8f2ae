"""Request bodies of ``POST /openai/v1/completions`` and ``/chat/completions``.

Marshmallow schemas turn the JSON into one frozen ``GenerationRequest``. Parameters OpenAI
has and EZTinker does not (``echo``, ``suffix``, ``best_of`` above ``n``, penalties,
``logit_bias``, tools, JSON mode, several prompts in one request) are refused with a 400
that names them, never silently ignored; unknown parameters are refused too, as OpenAI does.
Every optional parameter may be sent as an explicit ``null``, which means its default (OpenAI
declares them nullable, and clients built from typed request objects send every unset one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from marshmallow import EXCLUDE, RAISE, Schema, ValidationError, fields, validate

from eztinker_tasks.errors import InvalidRequest
from eztinker_tasks.limits import MAX_TOP_LOGPROBS
from eztinker_web.fields import FiniteFloat, JsonBoolean, JsonInteger

IGNORED = (  # accepted, no effect here
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
)  # fmt: skip
MAX_STOPS = 4  # as OpenAI


@dataclass(frozen=True)
class GenerationRequest:
    """One completions or chat request, validated (prompt not yet tokenized)."""

    chat: bool
    model: str
    prompt_text: str | None  # completions: text, or
    prompt_tokens: tuple[int, ...] | None  # completions: token ids
    messages: tuple[dict[str, str], ...] | None  # chat: {"role", "content"} each
    n: int
    max_tokens: int | None  # None: what the model's context leaves (chat's default)
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool


class StopField(fields.Field):
    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise ValidationError("stop must be a non-empty string or a list of them")
        if len(items) > MAX_STOPS:
            raise ValidationError(f"at most {MAX_STOPS} stop sequences")
        return tuple(items)


class StreamOptions(Schema):
    include_usage = JsonBoolean(load_default=False)


class _Common(Schema):  # loaded with unknown=RAISE: OpenAI refuses unknown arguments too
    model = fields.String(required=True, validate=validate.Length(min=1, max=512))
    n = JsonInteger(load_default=1, validate=validate.Range(min=1, max=128))
    temperature = FiniteFloat(load_default=1.0, validate=validate.Range(min=0.0, max=2.0))
    top_p = FiniteFloat(
        load_default=1.0, validate=validate.Range(min=0.0, max=1.0, min_inclusive=False)
    )
    stop = StopField(load_default=None, allow_none=True)
    seed = JsonInteger(load_default=None, allow_none=True)
    stream = JsonBoolean(load_default=False, allow_none=True)
    stream_options = fields.Nested(
        StreamOptions(unknown=EXCLUDE), load_default=None, allow_none=True
    )
    max_tokens = JsonInteger(load_default=None, allow_none=True, validate=validate.Range(min=1))
    presence_penalty = FiniteFloat(load_default=0.0, allow_none=True)
    frequency_penalty = FiniteFloat(load_default=0.0, allow_none=True)
    logit_bias = fields.Dict(load_default=None, allow_none=True)
    user = fields.Raw(load_default=None)
    metadata = fields.Raw(load_default=None)
    store = fields.Raw(load_default=None)
    service_tier = fields.Raw(load_default=None)
    prompt_cache_key = fields.Raw(load_default=None)
    safety_identifier = fields.Raw(load_default=None)


class _Completions(_Common):
    prompt = fields.Raw(required=True)
    logprobs = JsonInteger(
        load_default=None, allow_none=True, validate=validate.Range(min=0, max=MAX_TOP_LOGPROBS)
    )
    echo = JsonBoolean(load_default=False, allow_none=True)
    suffix = fields.String(load_default=None, allow_none=True)
    best_of = JsonInteger(load_default=None, allow_none=True)


class _Part(Schema):
    type = fields.String(required=True, validate=validate.OneOf(["text"]))
    text = fields.String(required=True)


class _Message(Schema):
    role = fields.String(
        required=True, validate=validate.OneOf(["system", "developer", "user", "assistant"])
    )
    content = fields.Raw(required=True, allow_none=True)  # null: an assistant turn only
    name = fields.String(load_default=None, allow_none=True)


class _Chat(_Common):
    messages = fields.List(
        fields.Nested(_Message(unknown=EXCLUDE)), required=True, validate=validate.Length(min=1)
    )
    max_completion_tokens = JsonInteger(
        load_default=None, allow_none=True, validate=validate.Range(min=1)
    )
    logprobs = JsonBoolean(load_default=False, allow_none=True)
    top_logprobs = JsonInteger(
        load_default=None, allow_none=True, validate=validate.Range(min=0, max=MAX_TOP_LOGPROBS)
    )
    tools = fields.Raw(load_default=None)
    tool_choice = fields.Raw(load_default=None)
    functions = fields.Raw(load_default=None)
    function_call = fields.Raw(load_default=None)
    parallel_tool_calls = fields.Raw(load_default=None)
    response_format = fields.Raw(load_default=None)
    modalities = fields.Raw(load_default=None)
    reasoning_effort = fields.Raw(load_default=None)
    verbosity = fields.Raw(load_default=None)
    prediction = fields.Raw(load_default=None)
    audio = fields.Raw(load_default=None)
    web_search_options = fields.Raw(load_default=None)


# chat parameters of models EZTinker does not serve (reasoning, audio, search): null only
_CHAT_UNSUPPORTED = ("reasoning_effort", "verbosity", "prediction", "audio", "web_search_options")


def _unsupported(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {why}", errors={param: [why]})


def _load(schema: Schema, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", errors={"body": ["not an object"]})
    declared = schema.fields
    # an optional parameter sent as null is left out (its default); required and unknown
    # ones are not, so that a null model or prompt, or a bogus argument, is still refused
    body = {
        k: v for k, v in body.items() if v is not None or k not in declared or declared[k].required
    }
    try:
        return schema.load(body)
    except ValidationError as exc:
        errors = exc.messages if isinstance(exc.messages, dict) else {"body": exc.messages}
        first = next(iter(errors), "body")
        problem = errors[first]
        text = problem[0] if isinstance(problem, list) and problem else problem
        if text == "Unknown field.":
            text = "unrecognized request argument"
        raise InvalidRequest(f"invalid {first}: {text}", errors=errors) from None


def _common_checks(data: dict[str, Any]) -> None:
    for param in ("presence_penalty", "frequency_penalty"):
        if data[param]:
            raise _unsupported(param, "penalties are not supported (only 0)")
    if data["logit_bias"]:
        raise _unsupported("logit_bias", "not supported")
    if data["stream_options"] is not None and not data["stream"]:
        raise _unsupported("stream_options", "only allowed with stream: true")


def _request(chat: bool, data: dict[str, Any], **kw: Any) -> GenerationRequest:
    options = data["stream_options"] or {}
    return GenerationRequest(
        chat=chat,
        model=data["model"],
        n=data["n"],
        temperature=data["temperature"],
        top_p=data["top_p"],
        stop=data["stop"] or (),
        seed=data["seed"],
        stream=bool(data["stream"]),
        include_usage=bool(options.get("include_usage")),
        **kw,
    )


def completion_request(body: Any) -> GenerationRequest:
    """``POST /completions``'s body. InvalidRequest (400) naming the parameter at fault."""
    data = _load(_Completions(unknown=RAISE), body)
    _common_checks(data)
    if data["echo"]:
        raise _unsupported("echo", "not supported")
    if data["suffix"]:
        raise _unsupported("suffix", "not supported")
    if data["best_of"] not in (None, 1, data["n"]):
        raise _unsupported("best_of", "only best_of = n is supported")
    text, tokens = _prompt(data["prompt"])
    top = data["logprobs"]
    return _request(
        False,
        data,
        prompt_text=text,
        prompt_tokens=tokens,
        messages=None,
        max_tokens=data["max_tokens"] or 16,
        logprobs=top is not None,
        top_logprobs=top or 0,
    )


def _is_token(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _prompt(prompt: Any) -> tuple[str | None, tuple[int, ...] | None]:
    """One prompt: text or token ids (a list of one of them is the same prompt)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt, None
    if isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        return None, tuple(prompt)
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, (str, list)) for p in prompt)
    ):
        raise _unsupported("prompt", "one prompt per request (send several requests, or use n)")
    raise _unsupported("prompt", "must be a non-empty string or a non-empty list of token ids")


def chat_request(body: Any) -> GenerationRequest:
    """``POST /chat/completions``'s body. InvalidRequest (400) naming the parameter at fault."""
    data = _load(_Chat(unknown=RAISE), body)
    _common_checks(data)
    for param in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
        if data[param] not in (None, [], "none"):
            raise _unsupported(param, "tool and function calling are not supported")
    for param in _CHAT_UNSUPPORTED:
        if data[param] is not None:
            raise _unsupported(param, "not supported by the models EZTinker serves")
    if data["modalities"] not in (None, ["text"]):
        raise _unsupported("modalities", "only ['text'] is supported")
    fmt = data["response_format"]
    if fmt is not None and fmt != {"type": "text"}:
        raise _unsupported("response_format", "only {'type': 'text'} is supported")
    if data["top_logprobs"] is not None and not data["logprobs"]:
        raise _unsupported("top_logprobs", "needs logprobs: true")
    a, b = data["max_tokens"], data["max_completion_tokens"]
    if a is not None and b is not None and a != b:
        raise _unsupported("max_completion_tokens", "disagrees with max_tokens")
    return _request(
        True,
        data,
        prompt_text=None,
        prompt_tokens=None,
        messages=tuple(_message(i, m) for i, m in enumerate(data["messages"])),
        max_tokens=a or b,
        logprobs=bool(data["logprobs"]),
        top_logprobs=data["top_logprobs"] or 0,
    )


def _message(i: int, message: dict[str, Any]) -> dict[str, str]:
    content = message["content"]
    if content is None and message["role"] == "assistant":
        content = ""  # a refusal or tool-call turn replayed from an earlier answer
    if isinstance(content, list):
        parts = []
        for part in content:
            try:
                parts.append(_Part(unknown=EXCLUDE).load(part)["text"])
            except ValidationError:
                raise _unsupported(
                    f"messages[{i}].content", "only text parts are supported"
                ) from None
        content = "".join(parts)
    if not isinstance(content, str):
        raise _unsupported(f"messages[{i}].content", "must be a string or a list of text parts")
    return {"role": message["role"], "content": content}
