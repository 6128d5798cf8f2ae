"""Schemas of the checkpoints resource."""

from __future__ import annotations

from marshmallow import Schema, fields


class CheckpointSchema(Schema):
    run_id = fields.String()
    name = fields.String()
    kind = fields.String(metadata={"description": "state (resumable) or sampler (PEFT adapter)"})
    path = fields.String(metadata={"description": "Portable path '<run_id>/<name>'"})
    directory = fields.String()
    step = fields.Integer()
    base_model = fields.String()
    created_at = fields.Float()
    size_bytes = fields.Integer()


class CheckpointListSchema(Schema):
    checkpoints = fields.List(fields.Nested(CheckpointSchema))
