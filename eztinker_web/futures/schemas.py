"""Schemas of the futures resource."""

from __future__ import annotations

from marshmallow import Schema, fields, validate


class WaitSchema(Schema):
    wait = fields.Float(
        load_default=0.0,
        validate=validate.Range(min=0.0, max=30.0),
        metadata={"description": "Long-poll up to this many seconds (at most 30)"},
    )


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
    wait = fields.Float(
        load_default=0.0,
        validate=validate.Range(min=0.0, max=30.0),
        metadata={"description": "Long-poll up to this many seconds until all are done"},
    )


class BatchSchema(Schema):
    futures = fields.List(fields.Nested(FutureSchema))
