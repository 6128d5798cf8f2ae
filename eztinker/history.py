"""A run's training history as the server keeps it (``GET /v1/runs/<id>/metrics``), and the
loss curve ``eztinker show`` draws from it in the terminal (with plotext)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LOSS = "loss:sum"


@dataclass(frozen=True)
class MetricPoint:
    """One ``forward_backward`` or ``optim_step`` of a run and its metrics.

    ``seq_id``: the op's number in its run; ``op``: ``forward_backward`` | ``optim_step``;
    ``step``: optimizer steps the run had applied when the op finished (an ``optim_step``: the
    step it made); ``time``: Unix seconds of its result; ``metrics``: name -> value
    (``loss:sum``, ``grad_norm``, ...).
    """

    seq_id: int
    op: str
    step: int
    time: float
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MetricPoint:
        return cls(
            int(data["seq_id"]),
            str(data["op"]),
            int(data["step"]),
            float(data["time"]),
            {str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
        )


def current_branch(points: Sequence[MetricPoint]) -> list[MetricPoint]:
    """The points of the run as it now stands, in seq_id order.

    A run that loads an earlier state goes back to that state's step and makes those steps
    again: an op that starts below the step the run had reached (a ``forward_backward`` at step
    s, an ``optim_step`` making step s, starts at s - 1) supersedes the earlier points from
    that step on, which are dropped. (A load of a state at the very step the run had reached
    leaves no trace in the steps, so it cannot be told apart.)
    """
    kept: list[MetricPoint] = []
    at = 0  # the step the run had reached
    for p in sorted(points, key=lambda p: p.seq_id):
        start = p.step - 1 if p.op == "optim_step" else p.step
        if start < at:
            kept = [
                q for q in kept if (q.step <= start if q.op == "optim_step" else q.step < start)
            ]
        kept.append(p)
        at = p.step
    return kept


def loss_by_step(points: Sequence[MetricPoint], metric: str = LOSS) -> list[tuple[int, float]]:
    """(step, loss) per optimizer step, in step order, of the run as it now stands
    (``current_branch``): the ``forward_backward`` losses of a step summed (a step's gradient
    accumulates over its forward_backwards, and losses are sums)."""
    total: dict[int, float] = {}
    for p in current_branch(points):
        if p.op == "forward_backward" and metric in p.metrics:
            total[p.step] = total.get(p.step, 0.0) + p.metrics[metric]
    return sorted(total.items())


def loss_plot(
    points: Sequence[MetricPoint], width: int = 72, height: int = 16, metric: str = LOSS
) -> str | None:
    """The loss curve as terminal text (plotext; no colours), or None without any loss."""
    import plotext

    plt: Any = plotext  # its functions are set up at import (a static checker sees none)

    series = loss_by_step(points, metric)
    if not series:
        return None
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")  # and the escape codes stripped: plain text, any terminal
    steps, losses = zip(*series, strict=True)
    plt.plot(list(steps), list(losses), marker="braille")
    first, last = steps[0], steps[-1]
    every = max(1, -(-(last - first) // 5))  # at most 6 whole-step ticks
    plt.xticks(list(range(first, last + 1, every)))
    plt.title(f"{metric} by step")
    plt.xlabel("step")
    return str(plt.uncolorize(plt.build()))
