"""A run's metrics history: every ``forward_backward`` and ``optim_step`` metric, with its step
and time, kept in Redis for as long as the run is (``GET /v1/runs/<id>/metrics`` serves it).

- ``ezt:run:<id>:metrics``: a hash, seq_id -> one ``MetricPoint`` as JSON.

A point is written by whoever stores the op's result, in the same MULTI/EXEC (the worker that
ran it, the pass that answered a coalesced call, or the recovery that answered an op of a dead
worker), with ``HSETNX``: the first answer of a seq_id is the one kept, so a redelivered,
resent or replayed op never adds a second point (a recovery replays answered ops without
answering them again, and writes nothing for them). Deleting the run deletes its history.
Torch-free: the web reads it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from eztinker_tasks import names
from eztinker_tasks.store_records import P, known_fields

# The ops whose metrics are kept, by task name -> the name a point gives its op.
RECORDED = {names.FORWARD_BACKWARD: "forward_backward", names.OPTIM_STEP: "optim_step"}


@dataclass(frozen=True)
class MetricPoint:
    """One op's metrics.

    ``seq_id``: the op's number in its run; ``op``: ``forward_backward`` | ``optim_step``;
    ``step``: the run's optimizer step when the op's result was stored (optim_steps applied so
    far, so an ``optim_step`` carries the step it made and a ``forward_backward`` the step its
    gradient goes into minus one); ``time``: Unix seconds when its result was stored;
    ``metrics``: name -> value as the op's result gives them (``loss:sum``, ``grad_norm``, ...;
    non-finite values left out).
    """

    seq_id: int
    op: str
    step: int
    time: float
    metrics: dict[str, float]

    @classmethod
    def from_json(cls, raw: str | bytes) -> MetricPoint:
        return cls(**known_fields(cls, json.loads(raw)))


def metrics_key(run_id: str) -> str:
    return f"{P}:run:{run_id}:metrics"


def point_of(
    task_name: str, seq_id: int | None, result: Mapping[str, Any], step: int | None
) -> MetricPoint | None:
    """The point an op's result makes, or None (not a recorded op, or no seq_id)."""
    op = RECORDED.get(task_name)
    raw = result.get("metrics")
    if op is None or seq_id is None or not isinstance(raw, Mapping):
        return None
    metrics = {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    return MetricPoint(seq_id, op, int(step or 0), time.time(), metrics)


def record_point(
    pipe: redis.client.Pipeline,
    run_id: str,
    task_name: str,
    seq_id: int | None,
    result: Mapping[str, Any],
    step: int | None,
) -> None:
    """Add to ``pipe``: the op's point, unless its seq_id has one already (see module doc)."""
    point = point_of(task_name, seq_id, result, step)
    if point is not None:
        pipe.hsetnx(metrics_key(run_id), str(point.seq_id), json.dumps(asdict(point)))


def read_points(client: redis.Redis, run_id: str, after: int = 0) -> list[MetricPoint]:
    """The run's points with a seq_id above ``after``, in seq_id order (undecodable: skipped)."""
    raw: Mapping[Any, Any] = client.hgetall(metrics_key(run_id))
    points = []
    for field, value in raw.items():
        try:
            if int(field) <= after:
                continue
            points.append(MetricPoint.from_json(value))
        except (TypeError, ValueError):
            continue
    return sorted(points, key=lambda p: p.seq_id)


def forget_points(client: redis.Redis, run_id: str) -> None:
    """Drop a deleted run's history."""
    client.delete(metrics_key(run_id))
