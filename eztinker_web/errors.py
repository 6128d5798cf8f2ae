"""One error envelope for every failure the API reports.

``{"code": "invalid_request", "status": 400, "category": "user", "message": "...",
"errors": {"field": ["problem"]}}``: typed ``EZTinkerError``s map to their own status and code;
webargs validation (422), malformed JSON (400), oversize bodies (413), unknown routes (404) and
unexpected crashes (500) are folded into the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

import marshmallow as ma
import redis
from flask import Flask, jsonify, request
from flask_smorest import Api
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
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "service_unavailable",
}


class ErrorSchema(ma.Schema):
    """The error envelope (documentation only)."""

    code = ma.fields.String(metadata={"description": "Machine-readable error code"})
    status = ma.fields.Integer(metadata={"description": "HTTP status"})
    category = ma.fields.String(metadata={"description": "user: fix the request; server: retry"})
    message = ma.fields.String(metadata={"description": "What went wrong, for humans"})
    errors = ma.fields.Dict(metadata={"description": "Problems by field"})


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
        body = envelope(status, _CODES.get(status, "error"), str(message), errors)
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
