"""One error envelope for every failure the API reports.

``{"code": "invalid_request", "status": 400, "category": "user", "message": "...",
"errors": {"field": ["problem"]}}``: typed ``EZTinkerError``s map to their own status and code;
webargs validation (422), malformed JSON (400), oversize bodies (413), unknown routes (404) and
unexpected crashes (500) are folded into the same shape.

The spec says which of these each operation can answer, each with this envelope's schema (no
catch-all ``default``): a route names the errors its own code raises (``@blp.errors(404, 409)``,
see ``blueprint.py``); ``ErrorResponsesPlugin`` adds those that come with the operation's shape.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import marshmallow as ma
import redis
from apispec import BasePlugin
from flask import Flask, jsonify, request
from flask_smorest import Api
from marshmallow import validate
from werkzeug.exceptions import HTTPException

from eztinker_tasks.errors import EZTinkerError, UnsupportedMediaType

log = logging.getLogger(__name__)

_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    431: "headers_too_large",
    503: "service_unavailable",
}


def error_code(status: int) -> str:
    """The envelope's ``code`` for an HTTP error that no ``EZTinkerError`` names."""
    return _CODES.get(status, "internal" if status == 500 else "error")


class ErrorSchema(ma.Schema):
    """The error envelope (documentation only)."""

    code = ma.fields.String(required=True, metadata={"description": "Machine-readable error code"})
    status = ma.fields.Integer(required=True, metadata={"description": "HTTP status"})
    category = ma.fields.String(
        required=True,
        validate=validate.OneOf(["user", "server"]),
        metadata={"description": "user: fix the request; server: retry"},
    )
    message = ma.fields.String(
        required=True, metadata={"description": "What went wrong, for humans"}
    )
    errors = ma.fields.Dict(required=True, metadata={"description": "Problems by field"})


def error_response(status: int) -> str:
    """The spec's response component for an error status: the envelope, under the status's name
    (flask-smorest registers one per HTTP status, with ``ERROR_SCHEMA``)."""
    return HTTPStatus(status).name


class ErrorResponsesPlugin(BasePlugin):
    """Documents, on every operation, the errors that come with its shape rather than its code:

    - 500 (a crash: ``internal``) and 503 (broker unreachable, no live worker) anywhere;
    - 401 on ``/v1`` (when ``EZTINKER_API_KEYS`` is set);
    - with a JSON body: 400 (malformed JSON), 413 (over ``EZTINKER_MAX_REQUEST_BYTES``), 415 (not
      sent as JSON), 422 (fails its schema);
    - with path or query parameters: 414, a request line over gunicorn's 4094 bytes (answered
      by gunicorn itself, in this envelope too: see ``gunicorn_hooks``).

    An operation's own declaration of a status (``/health``'s 503 body) is kept.
    """

    def operation_helper(
        self, path: str | None = None, operations: dict | None = None, **kwargs: Any
    ) -> None:
        for method, operation in (operations or {}).items():
            statuses = [500, 503]
            if path and path.startswith("/v1"):
                statuses.append(401)
            if "requestBody" in operation or method in ("post", "put", "patch"):
                statuses += [400, 413, 415, 422]
            has_query = any(
                isinstance(p, dict) and p.get("in") == "query"
                for p in operation.get("parameters", [])
            )
            if (path and "{" in path) or has_query:
                statuses.append(414)
            responses = operation.setdefault("responses", {})
            for status in sorted(statuses):
                responses.setdefault(status, error_response(status))


def envelope(
    status: int, code: str, message: str, errors: Any = None, category: str | None = None
) -> dict[str, Any]:
    return {
        "code": code,
        "status": status,
        "category": category or ("user" if status < 500 else "server"),
        "message": message,
        "errors": errors or {},
    }


def _flatten(errors: Any) -> Any:
    """webargs nests errors by location ({"json": {...}}); keep only the field map."""
    if isinstance(errors, dict) and set(errors) <= {"json", "query", "form", "files", "headers"}:
        merged: dict[str, Any] = {}
        for value in errors.values():
            if isinstance(value, dict):
                merged.update(value)
        return merged
    return errors


def _summary(errors: Any) -> str:
    if isinstance(errors, dict) and errors:
        parts = []
        for field, problems in list(errors.items())[:5]:
            text = problems if isinstance(problems, str) else _first_text(problems)
            parts.append(f"{field}: {text}")
        return "invalid request: " + "; ".join(parts)
    return "invalid request"


def _first_text(value: Any) -> str:
    if isinstance(value, list) and value:
        return _first_text(value[0])
    if isinstance(value, dict) and value:
        key, inner = next(iter(value.items()))
        return f"[{key}] {_first_text(inner)}"
    return str(value)


class EZTinkerApi(Api):
    """flask-smorest's Api with EZTinker's envelope for every HTTP error."""

    ERROR_SCHEMA = ErrorSchema
    # No catch-all "default" response: each operation lists the errors it can answer.
    DEFAULT_ERROR_RESPONSE_NAME = None

    def __init__(self, app: Flask) -> None:
        super().__init__(app, spec_kwargs={"extra_plugins": [ErrorResponsesPlugin()]})

    def handle_http_exception(self, error: HTTPException):  # type: ignore[override]
        status = error.code or 500
        data = getattr(error, "data", None) or {}
        errors = _flatten(data.get("messages") or data.get("errors"))
        if errors:
            message = _summary(errors)
        elif status == 400 and request.is_json and request.get_json(silent=True) is None:
            message = "malformed JSON body: the request body could not be parsed as JSON"
        else:
            message = data.get("message") or error.description or error.name
        body = envelope(status, error_code(status), str(message), errors)
        headers = data.get("headers") or {}
        return jsonify(body), status, headers


def require_json_bodies(app: Flask) -> None:
    """Refuse a request body that is not sent as JSON, instead of silently ignoring it."""

    @app.before_request
    def check_body_type():
        if request.method not in ("POST", "PUT", "PATCH") or not request.content_length:
            return None
        if request.is_json:
            return None
        if request.path.startswith("/api/v1/") and request.mimetype == "application/x-protobuf":
            return None  # Tinker's protobuf forward_backward (``tinker_api``)
        sent = request.mimetype or "no Content-Type"
        raise UnsupportedMediaType(
            f"the request body must be JSON sent with Content-Type: application/json "
            f"(got {sent}); with curl, add -H 'Content-Type: application/json'",
            errors={"Content-Type": [f"expected application/json, got {sent}"]},
        )


def register_error_handlers(app: Flask) -> None:
    def handle_ezt(error: EZTinkerError):
        body = error.to_dict()
        return jsonify(body), error.status, error.headers()

    def handle_crash(error: Exception):
        if isinstance(error, HTTPException):
            raise error
        log.exception("unhandled error")
        body = envelope(500, "internal", f"internal error: {type(error).__name__}")
        return jsonify(body), 500

    def handle_redis(error: redis.RedisError):
        body = envelope(503, "service_unavailable", f"broker unavailable: {error}")
        return jsonify(body), 503

    app.register_error_handler(EZTinkerError, handle_ezt)
    app.register_error_handler(redis.RedisError, handle_redis)
    app.register_error_handler(Exception, handle_crash)
