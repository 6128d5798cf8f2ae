"""Where each call sits in a packed pass, and what each call gets back from it.

``layout`` orders the calls of a pass (each run's calls together, in order) and finds their
rows and tokens; ``output`` cuts a call's result out of the pass's host arrays; ``describe``
builds the ``NonFiniteValue`` of a call whose loss or gradient was not finite.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from eztinker_tasks.engine.batching import PackedBatch
from eztinker_tasks.engine.finite import describe_non_finite
from eztinker_tasks.errors import NonFiniteValue
from eztinker_tasks.types import ForwardBackwardOutput

if TYPE_CHECKING:
    from eztinker_tasks.engine.passes import LossCall


@dataclass
class PassStats:
    """What a pass held: shown with each result (``batch``) so sharing is visible."""

    runs: int
    calls: int
    tokens: int
    sequences: int
    checkpointed: bool = False

    def to_dict(self) -> dict[str, int | bool]:
        return {
            "runs": self.runs,
            "calls": self.calls,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "activation_checkpointing": self.checkpointed,
        }


@dataclass
class Layout:
    """Where each call's rows and tokens sit in the packed batch."""

    order: list[int]  # call indices in packed order (grouped by run, stable)
    row_start: dict[int, int] = field(default_factory=dict)  # call -> first row (datum)
    token_span: dict[int, tuple[int, int]] = field(default_factory=dict)  # call -> [a, b)


def layout_of(calls: Sequence[LossCall]) -> Layout:
    first_seen: dict[str, int] = {}
    for i, call in enumerate(calls):
        first_seen.setdefault(call.run.run_id, i)
    order = sorted(range(len(calls)), key=lambda i: (first_seen[calls[i].run.run_id], i))
    layout = Layout(order)
    row = token = 0
    for i in order:
        n_tokens = sum(len(r.tokens) for r in calls[i].rows)
        layout.row_start[i] = row
        layout.token_span[i] = (token, token + n_tokens)
        row += len(calls[i].rows)
        token += n_tokens
    return layout


def run_spans(calls: Sequence[LossCall], layout: Layout) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}
    for i in layout.order:
        run_id = calls[i].run.run_id
        a, b = layout.token_span[i]
        spans[run_id] = (spans[run_id][0], b) if run_id in spans else (a, b)
    return spans


def describe(
    call: LossCall,
    batch: PackedBatch,
    layout: Layout,
    i: int,
    loss_rows: np.ndarray,
    lp_host: np.ndarray,
    grad_lp: np.ndarray | None,
    call_losses: dict[int, float],
) -> NonFiniteValue:
    first = layout.row_start[i]
    lengths = batch.lengths[first : first + len(call.rows)]
    a = layout.token_span[i][0]
    width = max(lengths)

    def rows_of(flat: np.ndarray) -> np.ndarray:
        out = np.zeros((len(lengths), width), dtype=np.float32)
        for r, start in enumerate(itertools.accumulate([0, *lengths[:-1]])):
            out[r, : lengths[r]] = flat[a + start : a + start + lengths[r]]
        return out

    inputs = {
        key: rows_of(value.detach().float().cpu().numpy())
        for key, value in batch.inputs.items()
        if any(key in row.floats for row in call.rows)
    }
    return describe_non_finite(
        call.op,
        call.loss_fn,
        lengths,
        [0],
        rows_of(loss_rows),
        rows_of(lp_host),
        rows_of(grad_lp) if grad_lp is not None else None,
        inputs,
        loss_finite=math.isfinite(call_losses[i]),
    )


def output(
    call: LossCall,
    batch: PackedBatch,
    layout: Layout,
    i: int,
    lp_host: np.ndarray,
    loss_rows: np.ndarray,
    call_losses: dict[int, float],
    stats: PassStats,
    extra: dict[str, float],
) -> ForwardBackwardOutput:
    first = layout.row_start[i]
    outputs = []
    for r in range(first, first + len(call.rows)):
        start, n = batch.starts[r], batch.lengths[r]
        outputs.append(
            {
                "logprobs": lp_host[start : start + n].tolist(),
                "elementwise_loss": loss_rows[start : start + n].tolist(),
            }
        )
    metrics = {
        "loss:sum": float(call_losses[i]),
        "num_tokens:sum": float(sum(len(r.tokens) for r in call.rows)),
        "num_sequences:sum": float(len(call.rows)),
        **{key: float(value) for key, value in extra.items()},
    }
    return ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=metrics, batch=stats.to_dict())
