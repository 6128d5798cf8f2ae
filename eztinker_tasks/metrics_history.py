"""A run's metrics history: every ``forward_backward`` and ``optim_step`` metric, with its step
and time, kept in Redis for as long as the run is (``GET /v1/runs/<id>/metrics`` serves it).

- ``ezt:run:<id>:metrics``: a sorted set of ``MetricPoint`` JSON, scored by seq_id, so a
  poll for the points after seq_id N reads only those.

A point is written by whoever stores the op's result, in the same MULTI/EXEC (the worker that
ran it, the pass that answered a coalesced call, or the recovery that answered an op of a dead
worker), by a script that adds it only if its seq_id has no point yet: the first answer of a
seq_id is the one kept, so a redelivered, resent or replayed op never adds a second point (a
recovery replays answered ops without answering them again, and writes nothing for them).
Deleting the run deletes its history. Torch-free: the web reads it.
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


# Add a point (ARGV[2]) at seq_id ARGV[1] unless that seq_id has one. KEYS: the run's metrics.
ADD_ONCE = """
if redis.call('ZCOUNT', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
end
"""


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
    if point is not None:  # EVAL, not EVALSHA: a MULTI cannot recover from NOSCRIPT
        pipe.eval(ADD_ONCE, 1, metrics_key(run_id), point.seq_id, json.dumps(asdict(point)))


def read_points(client: redis.Redis, run_id: str, after: int = 0) -> list[MetricPoint]:
    """The run's points with a seq_id above ``after``, in seq_id order (undecodable: skipped)."""
    points = []
    for raw in client.zrangebyscore(metrics_key(run_id), f"({after}", "+inf"):
        try:
            points.append(MetricPoint.from_json(raw if isinstance(raw, bytes | str) else ""))
        except (TypeError, ValueError, KeyError):
            continue
    return points


def forget_points(client: redis.Redis, run_id: str) -> None:
    """Drop a deleted run's history."""
    client.delete(metrics_key(run_id))
