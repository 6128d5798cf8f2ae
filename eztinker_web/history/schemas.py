"""Schemas of a run's history: metrics points and recent operations."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from eztinker_web.futures.schemas import FutureErrorSchema, TimingSchema

MAX_OPERATIONS = 200


class MetricsQuerySchema(Schema):
    after = fields.Integer(
        load_default=0,
        validate=validate.Range(min=0, max=10**12),
        metadata={"description": "Only points of ops with a seq_id above this (for polling)"},
    )
    format = fields.String(
        validate=validate.OneOf(["json", "csv"]),
        metadata={"description": "json (default) or csv; `Accept: text/csv` asks for CSV too"},
    )


class MetricPointSchema(Schema):
    seq_id = fields.Integer(required=True, metadata={"description": "the op's seq_id"})
    op = fields.String(required=True, validate=validate.OneOf(["forward_backward", "optim_step"]))
    step = fields.Integer(
        required=True,
        metadata={
            "description": "optimizer steps the run had applied when the op finished (an "
            "optim_step: the step it made)"
        },
    )
    time = fields.Float(required=True, metadata={"description": "Unix seconds of its result"})
    metrics = fields.Dict(
        keys=fields.String(),
        values=fields.Float(),
        required=True,
        metadata={"description": "the op's metrics (`loss:sum`, `grad_norm`, ...)"},
    )


class MetricsSchema(Schema):
    run_id = fields.String(required=True)
    points = fields.List(fields.Nested(MetricPointSchema), required=True)


class OperationsQuerySchema(Schema):
    limit = fields.Integer(
        load_default=20,
        validate=validate.Range(min=1, max=MAX_OPERATIONS),
        metadata={"description": f"How many of the newest ops (at most {MAX_OPERATIONS})"},
    )


class OperationSchema(Schema):
    future_id = fields.String(required=True)
    seq_id = fields.Integer(required=True)
    op = fields.String(required=True)
    status = fields.String(
        required=True, validate=validate.OneOf(["pending", "running", "succeeded", "failed"])
    )
    submitted_at = fields.Float(required=True)
    worker = fields.String(required=True, allow_none=True)
    timing = fields.Nested(TimingSchema, required=True, allow_none=True)
    error = fields.Nested(FutureErrorSchema, required=True, allow_none=True)


class OperationsSchema(Schema):
    run_id = fields.String(required=True)
    operations = fields.List(
        fields.Nested(OperationSchema),
        required=True,
        metadata={"description": "newest first"},
    )
