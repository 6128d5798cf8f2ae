"""Schemas of the futures resource."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, fields, validate

MAX_WAIT_S = 30.0


class WaitSeconds(fields.Float):
    """A long-poll time in seconds: negative is an error, more than 30 means 30."""

    def __init__(self, description: str) -> None:
        super().__init__(
            load_default=0.0,
            allow_nan=False,
            validate=validate.Range(min=0.0),
            metadata={"description": f"{description} (at most {MAX_WAIT_S:.0f}; more is capped)"},
        )

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        return min(float(super()._deserialize(value, attr, data, **kwargs)), MAX_WAIT_S)


class WaitSchema(Schema):
    wait = WaitSeconds("Long-poll up to this many seconds")


class FutureErrorSchema(Schema):
    code = fields.String()
    category = fields.String(metadata={"description": "user: fix the request; server: retry"})
    message = fields.String()
    errors = fields.Dict()


class FutureSchema(Schema):
    future_id = fields.String()
    job_id = fields.String()
    op = fields.String()
    run_id = fields.String(allow_none=True)
    seq_id = fields.Integer(allow_none=True)
    submitted_at = fields.Float()
    status = fields.String(metadata={"description": "pending | running | succeeded | failed"})
    result = fields.Raw(allow_none=True)
    error = fields.Nested(FutureErrorSchema, allow_none=True)


class BatchRequestSchema(Schema):
    future_ids = fields.List(
        fields.String(validate=validate.Length(min=1, max=128)),
        required=True,
        validate=validate.Length(min=1, max=1000),
        metadata={"description": "Up to 1,000 future ids"},
    )
    wait = WaitSeconds("Long-poll up to this many seconds until all are done")


class BatchSchema(Schema):
    futures = fields.List(fields.Nested(FutureSchema))
