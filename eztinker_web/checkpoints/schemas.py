"""Schemas of the checkpoints resource."""

from __future__ import annotations

from marshmallow import Schema, fields, validate


class CheckpointSchema(Schema):
    run_id = fields.String(required=True)
    name = fields.String(required=True)
    kind = fields.String(
        required=True,
        validate=validate.OneOf(["state", "sampler"]),
        metadata={"description": "state (resumable) or sampler (PEFT adapter)"})
    path = fields.String(required=True, metadata={"description": "Portable path '<run_id>/<name>'"})
    directory = fields.String(required=True)
    step = fields.Integer(required=True)
    base_model = fields.String(required=True)
    created_at = fields.Float(required=True)
    size_bytes = fields.Integer(required=True)


class CheckpointListSchema(Schema):
    checkpoints = fields.List(fields.Nested(CheckpointSchema), required=True)
