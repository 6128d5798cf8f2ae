"""OpenAI's error object on every error answered under ``/openai/v1``.

Every error of the app (ours, webargs', an unknown route, auth, a crash) is first answered in
EZTinker's one envelope (``eztinker_web.errors``); under ``/openai/`` an ``after_request`` hook
rewrites it as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with OpenAI's
status codes (a failed validation is 400, not 422), so the official client raises the right
exception (``BadRequestError``, ``NotFoundError``, ``AuthenticationError``, ...). Elsewhere the
envelope is unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask, Response, request

PREFIX = "/openai/"

_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
}


# ``/v1``'s field names where OpenAI's differ
PARAMS = {
    "prompt_tokens": "prompt",
    "num_samples": "n",
    "base_model": "model",
    "run_id": "model",
    "checkpoint": "model",
    "path": "model",
}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


def openai_error(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def from_envelope(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Our envelope as (OpenAI status, OpenAI error object)."""
    status = int(body.get("status") or 500)
    status = 400 if status == 422 else status
    errors = body.get("errors")
    param = next(iter(errors), None) if isinstance(errors, dict) and errors else None
    param = PARAMS.get(param, param) if param is not None else None
    code = body.get("code")
    if code in ("unknown_model", "unknown_run", "checkpoint_not_found") or (
        status == 404 and param in ("model", "path", "run_id", "base_model")
    ):
        code, param = "model_not_found", "model"
    return status, openai_error(status, str(body.get("message", "error")), code, param)


def install(app: Flask) -> None:
    """Rewrite error envelopes answered under ``/openai/`` as OpenAI error objects."""

    @app.after_request
    def _openai_errors(response: Response) -> Response:
        if response.status_code < 400 or not request.path.startswith(PREFIX):
            return response
        if response.is_streamed or response.mimetype != "application/json":
            return response
        try:
            body = json.loads(response.get_data())
        except ValueError:
            return response
        if not isinstance(body, dict) or "error" in body or "code" not in body:
            return response
        status, error = from_envelope(body)
        response.set_data(json.dumps(error))
        response.status_code = status
        return response
