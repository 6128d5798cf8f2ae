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
    code = fields.String(required=True)
    category = fields.String(
        required=True,
        validate=validate.OneOf(["user", "server"]),
        metadata={"description": "user: fix the request; server: retry"},
    )
    message = fields.String(required=True)
    errors = fields.Dict(required=True)


class ProgressSchema(Schema):
    phase = fields.String(
        metadata={
            "description": "queued | running | prefill | decode | forward | backward | "
            "recovering (running: started, no finer phase known; recovering: its worker died "
            "and the run's recovery will answer it)"
        }
    )
    ops_ahead = fields.Integer(
        allow_none=True,
        metadata={
            "description": "queued: operations waiting ahead of it in its queue (not counting "
            "one being run); null if unknown (being handed to its worker, or more than 1,000)"
        },
    )
    queue_length = fields.Integer(
        allow_none=True, metadata={"description": "queued: operations waiting in its queue"}
    )
    tokens_done = fields.Integer(
        allow_none=True, metadata={"description": "decode: tokens generated per sequence so far"}
    )
    tokens_total = fields.Integer(
        allow_none=True,
        metadata={
            "description": "decode: max_tokens; prefill: prompt tokens; forward/backward: "
            "tokens in the batch"
        },
    )
    sequences = fields.Integer(
        allow_none=True, metadata={"description": "samples, or datums in the batch"}
    )
    sequences_finished = fields.Integer(
        allow_none=True, metadata={"description": "decode: samples that have stopped"}
    )
    queued_s = fields.Float(metadata={"description": "seconds it waited (so far) in its queue"})
    elapsed_s = fields.Float(metadata={"description": "seconds it has been running (0 queued)"})


class TimingSchema(Schema):
    queued_ms = fields.Float(metadata={"description": "from submit to the operation's start"})
    run_ms = fields.Float(metadata={"description": "from its start to its result"})
    in_pass_of = fields.String(
        metadata={"description": "the future whose engine pass also ran this call, if another"}
    )


class FutureSchema(Schema):
    """A future (response only: ``required`` documents the fields always sent)."""

    future_id = fields.String(required=True)
    job_id = fields.String(required=True)
    op = fields.String(required=True)
    run_id = fields.String(required=True, allow_none=True)
    seq_id = fields.Integer(required=True, allow_none=True)
    submitted_at = fields.Float(required=True)
    status = fields.String(
        required=True, validate=validate.OneOf(["pending", "running", "succeeded", "failed"])
    )
    result = fields.Raw(required=True, allow_none=True)
    error = fields.Nested(FutureErrorSchema, required=True, allow_none=True)
    progress = fields.Nested(
        ProgressSchema,
        required=True,
        allow_none=True,
        metadata={
            "description": "while pending or running (null once done); published by the "
            "worker about every 0.5 s for operations that run longer than that"
        },
    )
    timing = fields.Nested(
        TimingSchema,
        allow_none=True,
        dump_default=None,
        metadata={"description": "once done: milliseconds queued and running"},
    )


class BatchRequestSchema(Schema):
    future_ids = fields.List(
        fields.String(validate=validate.Length(min=1, max=128)),
        required=True,
        validate=validate.Length(min=1, max=1000),
        metadata={"description": "Up to 1,000 future ids"},
    )
    wait = WaitSeconds("Long-poll up to this many seconds until all are done")


class BatchSchema(Schema):
    futures = fields.List(fields.Nested(FutureSchema), required=True)
