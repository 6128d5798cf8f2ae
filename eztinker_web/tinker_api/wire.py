"""The ``/api/v1`` blueprint and reading its JSON bodies into checked values."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from eztinker_tasks.errors import InvalidRequest

blp = Blueprint("tinker_api", __name__, url_prefix="/api/v1")


def body_of() -> dict[str, Any]:
    """The JSON object the request carries ({} for none; InvalidRequest for anything else)."""
    body = request.get_json(silent=True)
    if body is None and request.content_length:
        raise InvalidRequest("the body must be a JSON object", errors={"json": ["not JSON"]})
    if body is not None and not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", errors={"json": ["not an object"]})
    return body or {}


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...):
    """``body[name]``, of type ``kind`` (a bool is no int); required unless ``default`` given."""
    value = body.get(name, default)
    if value is ...:
        raise InvalidRequest(f"{name} is required", errors={name: ["required"]})
    if value is not default and (
        (isinstance(value, bool) and kind is int) or not isinstance(value, kind)
    ):
        raise InvalidRequest(f"{name} has the wrong type", errors={name: ["wrong type"]})
    return value
