"""The blueprint every resource uses: flask-smorest's, with a JSON body parser that refuses
what the standard library's parser lets through or crashes on.

- nesting too deep (``[[[[...]]]]``: RecursionError) and integers beyond Python's digit limit
  (ValueError) would be 500s: they are 400 ``invalid_request``;
- a lone UTF-16 surrogate (``"\\ud800"``, legal in JSON's escapes, not in UTF-8) would reach
  tokenizers, file names and Redis and fail there as a ``server`` error: it is a 400 too.
  Only bodies that contain a ``\\ud8``-``\\udf`` escape are scanned for them, so ordinary
  requests pay nothing.

``@blp.errors(404, 409)`` documents the error statuses a route's own code answers, each with
the one error envelope (the errors every operation of its shape can answer are added for it:
``errors.ErrorResponsesPlugin``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import flask
import flask_smorest
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from eztinker_tasks.errors import InvalidRequest
from eztinker_web.errors import error_response

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


class JsonBodyParser(FlaskParser):
    def _raw_load_json(self, req: flask.Request) -> Any:
        if not is_json_request(req):
            return core.missing
        raw = req.get_data(cache=True)
        try:
            data = core.parse_json(raw)
        except json.JSONDecodeError:
            raise  # webargs' own "invalid JSON" path
        except RecursionError:
            raise InvalidRequest(
                "the JSON body is nested too deeply", errors={"json": ["nested too deeply"]}
            ) from None
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise InvalidRequest(
                f"the JSON body holds a value that cannot be read: {exc}",
                errors={"json": [str(exc)]},
            ) from None
        if _SURROGATE_ESCAPE.search(raw) and _has_surrogate(data):
            raise InvalidRequest(
                "the JSON body holds a lone UTF-16 surrogate (\\ud800-\\udfff) in a string: "
                "text must be valid Unicode",
                errors={"json": ["lone surrogate in a string"]},
            )
        return data


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = JsonBodyParser()

    def errors(self, *statuses: int) -> Callable[[Callable], Callable]:
        """Document that the route answers these error statuses (in the error envelope)."""

        def decorator(func: Callable) -> Callable:
            for status in statuses:
                func = self.alt_response(status, response=error_response(status))(func)
            return func

        return decorator
